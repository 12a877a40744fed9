"""Optax-style gradient transforms: optimizers, local corrections and ``chain``."""
from atoll.transforms.base import Transform, apply_updates, chain, identity
from atoll.transforms.corrections import frozen, proximal, shift
from atoll.transforms.optim import adagrad, adam, add_decayed_weights, momentum, sgd, yogi

__all__ = [
    "Transform", "apply_updates", "chain", "identity",
    "sgd", "momentum", "adam", "yogi", "adagrad", "add_decayed_weights",
    "proximal", "shift", "frozen",
]
