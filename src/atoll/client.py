"""Local training: the pure ``ClientUpdate``.

``local_training(loss_fn, transform)`` returns a function

    update(params, client_state, broadcast, batches, step_mask, key) -> ClientResult

that runs ``S`` local steps of ``transform`` from ``params`` on ``batches`` (a dict of
``x (S, B, ...)``, ``y (S, B)``, ``mask (S, B)``; padded samples have mask False). Step ``s``
runs only where ``step_mask[s]`` is true; a masked step leaves parameters and optimizer state
untouched, which expresses clients with fewer steps (stragglers, heterogeneous devices) in
one fixed-shape computation. The function is pure tensor code: it serves one client, or many
under ``torch.func.vmap`` (issue: vectorised runtime).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value
from torch.utils._pytree import tree_map

from atoll import tree as T
from atoll.transforms.base import Transform, apply_updates
from atoll.tree import Tree
from atoll.types import ClientResult

LossFn = Callable[[Tree, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ClientUpdate = Callable[..., ClientResult]


def model_loss(model: torch.nn.Module) -> LossFn:
    """Masked mean cross-entropy of ``model`` as a pure function of its parameters."""

    def loss_fn(params, x, y, mask):
        logits = functional_call(model, params, (x,))
        per_sample = F.cross_entropy(logits, y, reduction="none")
        m = mask.to(per_sample.dtype)
        return (per_sample * m).sum() / m.sum().clamp(min=1.0)

    loss_fn.model = model  # lets a runtime recognise the model and take a fused fast path
    return loss_fn


def params_of(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Tree:
    """A detached copy of the model's parameters as a tree."""
    return {k: v.detach().clone().to(dtype or v.dtype) for k, v in model.named_parameters()}


def local_training(loss_fn: LossFn, transform: Transform) -> ClientUpdate:
    """Build the pure ClientUpdate running ``transform`` on ``loss_fn``."""
    step_fn = grad_and_value(loss_fn)

    def update(params: Tree, client_state: dict[str, Any], broadcast: dict[str, Tree],
               batches: dict[str, torch.Tensor], step_mask: torch.Tensor, key: int) -> ClientResult:
        p, metrics = run_steps(step_fn, transform, params, batches, step_mask,
                               {"broadcast": broadcast, "key": key})
        return ClientResult(T.sub(p, params), {}, client_state, metrics)

    update.parts = (loss_fn, transform)  # what a runtime's fast path needs to reproduce it
    return update


def run_steps(grad_fn, transform: Transform, params: Tree, batches: dict[str, torch.Tensor],
              step_mask: torch.Tensor, ctx: dict, correction: Tree | None = None,
              first: tuple[Tree, torch.Tensor] | None = None) -> tuple[Tree, dict]:
    """The masked local steps: ``(final params, metrics)``. Step ``s`` runs ``transform`` on
    ``grad_fn``'s gradient (plus a constant ``correction``, as SCAFFOLD and FedaGrac add) only
    where ``step_mask[s]`` is true. ``first``: ``(grads, loss)`` of step 0, if already computed
    (FedaGrac needs it before it can form its correction)."""
    opt_state = transform.init(params)
    p = params
    loss_sum = torch.zeros((), dtype=_dtype(params))
    seen = torch.zeros((), dtype=_dtype(params))
    for s in range(batches["y"].shape[0]):  # (S, B, ...)
        if s == 0 and first is not None:
            grads, loss = first
        else:
            grads, loss = grad_fn(p, batches["x"][s], batches["y"][s], batches["mask"][s])
        if correction is not None:
            grads = T.add(grads, correction)
        updates, new_state = transform.update(grads, opt_state, p, ctx)
        active = step_mask[s]
        p = T.where(active, apply_updates(p, updates), p)
        opt_state = tree_map(lambda a, b: torch.where(active, a, b), new_state, opt_state)
        n = batches["mask"][s].sum().to(loss.dtype) * active.to(loss.dtype)
        loss_sum = loss_sum + loss.detach() * n
        seen = seen + n
    metrics = {"loss": loss_sum / seen.clamp(min=1.0), "samples": seen, "steps": step_mask.sum()}
    return p, metrics


def _dtype(tree: Tree) -> torch.dtype:
    return next(iter(tree.values())).dtype
