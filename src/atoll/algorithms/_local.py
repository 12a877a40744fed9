"""Local SGD with a constant gradient correction: the client half shared by SCAFFOLD and
FedaGrac (and the step-count wrapper FedNova uses).

``corrected_steps`` runs the masked steps of ``local_training`` (``client.py``) on
``g(x) + correction`` instead of ``g(x)``; it also takes the gradient of step 0 precomputed,
because FedaGrac needs that gradient (its ``v_i``) before it can form the correction. Pure
tensor code, vmap-safe: step ``s`` runs only where ``step_mask[s]`` is true.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from atoll import tree as T
from atoll.transforms.base import Transform, apply_updates
from atoll.tree import Tree
from atoll.types import ClientResult


def corrected_steps(grad_fn, transform: Transform, params: Tree, correction: Tree | None,
                    batches: dict, step_mask: torch.Tensor, ctx: dict,
                    first: tuple[Tree, torch.Tensor] | None = None) -> tuple[Tree, dict]:
    """Run the masked local steps; returns (final params, metrics like ``local_training``'s).
    ``first``: ``(grads, loss)`` of step 0 at ``params`` if already computed."""
    opt_state = transform.init(params)
    p = params
    dtype = next(iter(params.values())).dtype
    loss_sum = torch.zeros((), dtype=dtype)
    seen = torch.zeros((), dtype=dtype)
    for s in range(batches["y"].shape[0]):
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
    return p, {"loss": loss_sum / seen.clamp(min=1.0), "samples": seen, "steps": step_mask.sum()}


def steps_taken(step_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``K_i`` as a float tensor, at least 1 (so it can divide)."""
    return step_mask.sum().to(dtype).clamp(min=1.0)


def result(params: Tree, final: Tree, aux: Tree, client_state: dict, metrics: dict) -> ClientResult:
    return ClientResult(T.sub(final, params), aux, client_state, metrics)
