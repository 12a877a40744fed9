"""Clipping codecs: bound an update before noise is added (biased, no privacy event).

``clip_l2(c)`` scales the whole tree so its global L2 norm is at most ``c``;
``clip_l1(c)`` scales it to global L1 norm at most ``c``; ``clip_linf(c)`` clamps every
coordinate to ``[-c, c]``. Clipping is what gives the noise
codecs that follow a sensitivity: after ``clip_l2(c)`` one client's update moves by at most
``c`` in L2 when it is added or removed (``2c`` under replacement). Neither is linear or
unbiased; neither releases anything by itself (``event = None``). Payload = the clipped tree.
"""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.codecs.base import Codec


def clip_l2(c: float) -> Codec:
    """Scale the tree by ``min(1, c / ||tree||_2)`` (global norm over all leaves)."""
    _positive(c, "clip_l2")

    def encode(tree, state, key):
        norm = T.norm(tree)
        factor = torch.clamp(c / torch.clamp(norm, min=1e-30), max=1.0)
        return {k: v * factor.to(v.dtype) for k, v in tree.items()}, state

    return Codec(f"clip_l2({c:g})", init=lambda tree: (), encode=encode, decode=dict,
                 linear=False, unbiased=False)


def clip_l1(c: float) -> Codec:
    """Scale the tree by ``min(1, c / ||tree||_1)`` (global L1 norm over all leaves): the
    bound the Laplace mechanism needs."""
    _positive(c, "clip_l1")

    def encode(tree, state, key):
        norm = sum(v.abs().sum() for v in tree.values())
        factor = torch.clamp(c / torch.clamp(norm, min=1e-30), max=1.0)
        return {k: v * factor.to(v.dtype) for k, v in tree.items()}, state

    return Codec(f"clip_l1({c:g})", init=lambda tree: (), encode=encode, decode=dict,
                 linear=False, unbiased=False)


def clip_linf(c: float) -> Codec:
    """Clamp every coordinate to ``[-c, c]``."""
    _positive(c, "clip_linf")

    def encode(tree, state, key):
        return {k: torch.clamp(v, -c, c) for k, v in tree.items()}, state

    return Codec(f"clip_linf({c:g})", init=lambda tree: (), encode=encode, decode=dict,
                 linear=False, unbiased=False)


def _positive(c: float, name: str) -> None:
    if not c > 0:
        raise ValueError(f"{name}: the clip bound must be > 0, got {c}")
