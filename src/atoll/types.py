"""Frozen records that flow between the stages of a round."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from one round to the next."""

    params: Tree
    opt_state: Any
    round: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
