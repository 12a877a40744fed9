"""Frozen records that flow between the stages of a round."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from atoll.tree import Tree


@dataclass(frozen=True)
class ClientResult:
    """What one client's local training returns.

    ``delta``: local model minus the broadcast model (the update sent up).
    ``aux``: other trees the algorithm sends up (e.g. a gradient or control variate).
    ``client_state``: the client's new persistent state (optimizer, corrections, codecs).
    ``metrics``: scalar tensors (``loss`` = mean training loss, ``samples``, ``steps``).
    """

    delta: Tree
    aux: Tree
    client_state: dict[str, Any]
    metrics: dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class GradFn:
    """A gradient estimator ``(params, step) -> (grads, loss, new buffers)`` and the entries of
    ``params`` that are buffers (not trained: each step replaces them with the new ones)."""
    fn: Callable
    buffers: tuple[str, ...] = ()

    def __call__(self, p, step):
        return self.fn(p, step)


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from one round to the next."""

    params: Tree
    opt_state: Any
    round: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
