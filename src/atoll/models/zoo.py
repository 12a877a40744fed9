"""Reference models and ``build``, which turns a config name into an ``nn.Module``.

Plain models (the defaults) are pure functions of their parameters: no buffers, nothing
random. ``mlp`` and ``cnn`` optionally add BatchNorm (``batch_norm = true``: running statistics
as buffers) and dropout (``dropout = p``); atoll trains such models in train mode and evaluates
them in eval mode (docs/simulation.md, "Models with buffers and dropout"). All models take
flat features ``(N, n_features)`` and return logits ``(N, n_classes)``; ``lstm_lm``'s features
are the previous ``n_features`` token ids (docs/keyboard.md).
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from atoll import rng


def logreg(n_features: int, n_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer (softmax lives in the loss)."""
    return nn.Linear(n_features, n_classes)


def mlp(n_features: int, n_classes: int, hidden: int | tuple[int, ...] = (200, 200),
        batch_norm: bool = False, dropout: float = 0.0) -> nn.Module:
    """Fully connected ReLU network, e.g. the 2NN of McMahan et al. 2017 (two layers of 200);
    optionally ``BatchNorm1d`` before and ``Dropout(dropout)`` after each ReLU."""
    widths = [n_features, *((hidden,) if isinstance(hidden, int) else hidden)]
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), *([nn.BatchNorm1d(w_out)] if batch_norm else []),
                   nn.ReLU(), *([nn.Dropout(dropout)] if dropout else [])]
    layers.append(nn.Linear(widths[-1], n_classes))
    return nn.Sequential(*layers)


class CNN(nn.Module):
    """Small CNN for square single-channel images given as flat rows (default 8x8 = 64).

    ``(N, side*side) -> (N, 1, side, side)`` -> [conv3x3 pad 1 -> ReLU -> maxpool 2] x 2 ->
    linear. ``side`` must be a multiple of 4 so both poolings are exact.
    """

    def __init__(self, n_features: int = 64, n_classes: int = 10,
                 channels: tuple[int, int] = (16, 32), batch_norm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        side = math.isqrt(n_features)
        if side * side != n_features or side % 4 or side == 0:
            raise ValueError(f"cnn: n_features must be side*side with side a multiple of 4 "
                             f"(e.g. 64 for 8x8 images), got {n_features}")
        c1, c2 = channels
        self.side = side
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.fc = nn.Linear(c2 * (side // 4) ** 2, n_classes)
        self.norm1 = nn.BatchNorm2d(c1) if batch_norm else nn.Identity()
        self.norm2 = nn.BatchNorm2d(c2) if batch_norm else nn.Identity()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, 1, self.side, self.side)
        h = F.max_pool2d(F.relu(self.norm1(self.conv1(h))), 2)
        h = F.max_pool2d(F.relu(self.norm2(self.conv2(h))), 2)
        return self.fc(self.drop(h.flatten(1)))


def cnn(n_features: int = 64, n_classes: int = 10, channels: tuple[int, int] = (16, 32),
        batch_norm: bool = False, dropout: float = 0.0) -> nn.Module:
    """The ``CNN`` above (a function, for symmetry with ``logreg`` and ``mlp``)."""
    return CNN(n_features, n_classes, tuple(channels), batch_norm, dropout)


class LSTMLM(nn.Module):
    """Next-word LSTM for token ids given as float rows ``(N, k)`` (the previous ``k`` ids).

    ``x`` holds integer ids ``0..vocab-1`` (exact in float32 below 2**24; the data sets stay
    float tensors, so batching and the runtimes need nothing new) -> embedding ``embed`` ->
    one LSTM layer of ``hidden`` units unrolled over the ``k`` positions with plain ``Linear``
    gates (pure under ``torch.func.vmap``, unlike ``nn.LSTM``) -> logits over ``n_classes``
    next words from the last state. ``vocab`` defaults to ``n_classes``.
    """

    def __init__(self, n_features: int, n_classes: int, vocab: int | None = None,
                 embed: int = 32, hidden: int = 64):
        super().__init__()
        vocab = n_classes if vocab is None else vocab
        if min(n_features, n_classes, vocab, embed, hidden) < 1:
            raise ValueError(f"lstm_lm: n_features (context length), n_classes, vocab, embed and "
                             f"hidden must be >= 1, got {n_features}, {n_classes}, {vocab}, "
                             f"{embed}, {hidden}")
        self.context, self.hidden = n_features, hidden
        self.embed = nn.Embedding(vocab, embed)
        self.gates_x = nn.Linear(embed, 4 * hidden)
        self.gates_h = nn.Linear(hidden, 4 * hidden, bias=False)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x.reshape(-1, self.context).long())  # (N, k, embed)
        gx = self.gates_x(e)
        h = c = gx.new_zeros(gx.shape[0], self.hidden)
        for t in range(self.context):
            i, f, g, o = (gx[:, t] + self.gates_h(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.out(h)


def lstm_lm(n_features: int, n_classes: int, vocab: int | None = None, embed: int = 32,
            hidden: int = 64) -> nn.Module:
    """The ``LSTMLM`` above: ``n_features`` is the context length, ``n_classes`` the vocabulary."""
    return LSTMLM(n_features, n_classes, vocab, embed, hidden)


MODELS: dict[str, Callable[..., nn.Module]] = {"logreg": logreg, "mlp": mlp, "cnn": cnn,
                                                "lstm_lm": lstm_lm}


def build(name: str, n_features: int, n_classes: int, *, seed: int = 0, **kwargs) -> nn.Module:
    """Build a model by registry name (``logreg``, ``mlp``, ``cnn``, ``lstm_lm``) or import path.

    The initial weights are drawn from ``seed`` (default 0; the key ``rng.key(seed, 0, SERVER,
    "model-init")``, the one ``atoll run`` uses for its ``seed``), without touching torch's
    global generator: the same call gives the same model in every process.

    An import path ``"package.module:Attr"`` names a class or factory. It receives
    ``n_features=`` / ``n_classes=`` only where its signature names those parameters (each one
    separately), plus ``kwargs``; so ``"torch.nn:Linear"`` needs ``in_features`` and
    ``out_features`` in ``kwargs``. Unknown names and failed imports raise ``ValueError``.
    """
    with torch.random.fork_rng():
        torch.manual_seed(rng.key(seed, 0, rng.SERVER, "model-init"))
        return _build(name, n_features, n_classes, **kwargs)


def _build(name: str, n_features: int, n_classes: int, **kwargs) -> nn.Module:
    if name in MODELS:
        return MODELS[name](n_features, n_classes, **kwargs)
    if ":" not in name:
        raise ValueError(f"unknown model {name!r}; valid names are {sorted(MODELS)} "
                         f"or an import path 'package.module:Class'")
    factory = _import(name)
    shape = {"n_features": n_features, "n_classes": n_classes}
    accepted = _named_parameters(factory)
    return factory(**{k: v for k, v in shape.items() if k in accepted}, **kwargs)


def _import(path: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:Attr.sub"`` to an object, with errors naming the path."""
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except (ImportError, ValueError) as e:
        raise ValueError(f"model {path!r}: cannot import module {module_name!r} ({e})") from e
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        raise ValueError(f"model {path!r}: module {module_name!r} has no attribute {attr!r}") from e
    if not callable(obj):
        raise ValueError(f"model {path!r} is not a class or callable")
    return obj


def _named_parameters(factory: Callable) -> set[str]:
    """Parameter names a callable accepts by keyword (``**kwargs`` does not count)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds}
