"""Small helpers shared by the client halves of SCAFFOLD, FedaGrac and FedNova. Their local
steps are ``client.run_steps`` (the loop of ``local_training``) with a constant gradient correction
(``transforms.shift``) and, for FedaGrac, the gradient of step 0 precomputed."""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.tree import Tree
from atoll.types import ClientResult


def steps_taken(step_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``K_i`` as a float tensor, at least 1 (so it can divide)."""
    return step_mask.sum().to(dtype).clamp(min=1.0)


def result(params: Tree, final: Tree, aux: Tree, client_state: dict, metrics: dict) -> ClientResult:
    return ClientResult(T.sub(final, params), aux, client_state, metrics)
