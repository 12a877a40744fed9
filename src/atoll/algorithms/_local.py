"""Small helpers shared by the client halves of SCAFFOLD, FedaGrac and FedNova (their local
steps are ``client.run_steps``, the loop of ``local_training``, with a constant gradient correction,
``transforms.shift``, and, for FedaGrac, the gradient of step 0 precomputed), and of pFedMe and
Per-FedAvg (joined trees, and the extras they refuse)."""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.client import ModelLoss
from atoll.tree import Tree
from atoll.types import ClientResult


def steps_taken(step_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``K_i`` as a float tensor, at least 1 (so it can divide)."""
    return step_mask.sum().to(dtype).clamp(min=1.0)


def result(params: Tree, final: Tree, aux: Tree, client_state: dict, metrics: dict) -> ClientResult:
    return ClientResult(T.sub(final, params), aux, client_state, metrics)


def refuse_extras(name: str, loss_fn, grad_fn) -> None:
    """ValueError for DP-SGD's estimator (its accounting assumes one gradient per step) and for
    models with buffers (the extra passes would move BatchNorm's statistics)."""
    if grad_fn is not None or isinstance(loss_fn, ModelLoss) and loss_fn.buffers:
        raise ValueError(f"{name}: needs the plain gradient of a model without buffers "
                         "(no DP-SGD estimator, no BatchNorm)")


def prefixed(prefix: str, tree):
    return {f"{prefix}{k}": v for k, v in tree.items()}


def part(tree, prefix: str):
    return {k[len(prefix):]: v for k, v in tree.items() if k.startswith(prefix)}
