"""Local training: the pure ``ClientUpdate``.

``local_training(loss_fn, transform)`` returns a function

    update(params, client_state, broadcast, batches, step_mask, key) -> ClientResult

that runs ``S`` local steps of ``transform`` from ``params`` on ``batches`` (a dict of
``x (S, B, ...)``, ``y (S, B)``, ``mask (S, B)``; padded samples have mask False). Step ``s``
runs only where ``step_mask[s]`` is true; a masked step leaves parameters and optimizer state
untouched, which expresses clients with fewer steps (stragglers, heterogeneous devices) in
one fixed-shape computation. The function is pure tensor code: it serves one client, or many
under ``torch.func.vmap`` (the vectorised runtime).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value
from torch.utils._pytree import tree_map

from atoll import tree as T
from atoll.transforms.base import Transform, apply_updates
from atoll.tree import Tree
from atoll.types import ClientResult, GradFn

LossFn = Callable[[Tree, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class ModelLoss:
    """Masked mean cross-entropy of ``model`` in train mode, as a pure function of its state
    (``model_loss``), with what a runtime must know of the model declared: ``buffers`` (the
    entries of ``params`` that are state, not trained: BatchNorm's running statistics; vmap
    gives each client its own copy) and ``random`` (training draws random numbers: dropout).

    ``params`` holds the parameters and, for a model with buffers, the buffers too
    (``params_of``); ``with_buffers(params, x, y, mask) -> (loss, new buffers)`` also returns
    the buffers the forward pass updated (on copies: the inputs are never written)."""
    model: torch.nn.Module
    buffers: tuple[str, ...] = ()
    random: bool = False
    loss = "masked_cross_entropy"  # what it computes: the fused engine reproduces exactly this

    def __call__(self, params, x, y, mask):
        if not self.model.training:
            self.model.train()
        return _masked_ce(functional_call(self.model, params, (x,)), y, mask)

    def with_buffers(self, params, x, y, mask):
        if not self.model.training:
            self.model.train()
        missing = [k for k in self.buffers if k not in params]
        if missing:
            raise ValueError(f"{type(self.model).__name__}: the parameter tree lacks the model's "
                             f"buffers {missing[:3]} (build it with atoll.client.params_of)")
        bufs = {k: params[k].clone() for k in self.buffers}  # BatchNorm updates these in place
        logits = functional_call(self.model, {**params, **bufs}, (x,))
        return _masked_ce(logits, y, mask), bufs


def model_loss(model: torch.nn.Module) -> ModelLoss:
    """``model``'s ``ModelLoss``."""
    return ModelLoss(model, buffer_names(model), uses_dropout(model))


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    """A client's pure update ``(params, client_state, broadcast, batches, step_mask, key) ->
    ClientResult`` with the ``loss`` it trains; ``transform`` is set only where the update is
    ``local_training`` on the loss's plain gradient, which a runtime's fast path (the fused
    engine) may reproduce."""
    fn: Callable[..., ClientResult]
    loss: Any = None
    transform: Transform | None = None

    def __call__(self, params, client_state, broadcast, batches, step_mask, key):
        return self.fn(params, client_state, broadcast, batches, step_mask, key)

    @property
    def buffers(self) -> tuple[str, ...]:
        return self.loss.buffers if isinstance(self.loss, ModelLoss) else ()

    @property
    def random(self) -> bool:
        return isinstance(self.loss, ModelLoss) and self.loss.random

    @property
    def model_name(self) -> str:
        return type(self.loss.model).__name__ if isinstance(self.loss, ModelLoss) else "?"


def as_update(update) -> ClientUpdate:
    """``update`` as a ``ClientUpdate`` (a bare function: no loss known)."""
    return update if isinstance(update, ClientUpdate) else ClientUpdate(update)


def _masked_ce(logits, y, mask):
    per_sample = F.cross_entropy(logits, y, reduction="none")
    m = mask.to(per_sample.dtype)
    return (per_sample * m).sum() / m.sum().clamp(min=1.0)


def buffer_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The names of ``model``'s buffers (BatchNorm's running mean, variance and batch count)."""
    return tuple(k for k, _ in model.named_buffers())


def uses_dropout(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a dropout layer (random in train mode)."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in model.modules())


def params_of(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Tree:
    """A detached copy of the model's state as a tree: its parameters, then its buffers.
    Integer buffers (BatchNorm's ``num_batches_tracked``) become floating point of the
    parameters' dtype, so that they travel, aggregate and validate like the rest."""
    out = {k: v.detach().clone().to(dtype or v.dtype) for k, v in model.named_parameters()}
    floating = dtype or (next(iter(out.values())).dtype if out else torch.get_default_dtype())
    for k, v in model.named_buffers():
        out[k] = v.detach().clone().to(dtype or (v.dtype if v.is_floating_point() else floating))
    return out


def value_and_grad(loss_fn: LossFn):
    """The plain gradient estimator: ``(params, step) -> (grads, loss, new buffers)``, where
    ``step`` is one step's slice of the batches (``x``, ``y``, ``mask``, ...): the gradient of
    ``loss_fn`` (zero for buffer entries) and the buffers its forward pass updated (``{}`` if
    none). Another estimator (DP-SGD's clipped and noised per-sample sum,
    ``privacy.dpsgd.dp_gradients``) has the same signature and plugs into the same step loop."""
    names = loss_fn.buffers if isinstance(loss_fn, ModelLoss) else ()
    if not names:
        g = grad_and_value(loss_fn)

        def plain(p, step):
            grads, loss = g(p, step["x"], step["y"], step["mask"])
            return grads, loss, {}

        return GradFn(plain)
    g = grad_and_value(lambda p, b, x, y, m: loss_fn.with_buffers({**p, **b}, x, y, m), has_aux=True)

    def stateful(p, step):
        trainable, bufs = split_buffers(p, names)
        grads, (loss, new) = g(trainable, bufs, step["x"], step["y"], step["mask"])
        return {k: grads[k] if k in grads else torch.zeros_like(v) for k, v in p.items()}, loss, new

    return GradFn(stateful, names)


def split_buffers(tree: Tree, names) -> tuple[Tree, Tree]:
    """``(entries not in names, entries in names)``."""
    return ({k: v for k, v in tree.items() if k not in names},
            {k: v for k, v in tree.items() if k in names})


def local_training(loss_fn: LossFn, transform: Transform, grad_fn=None) -> ClientUpdate:
    """Build the pure ClientUpdate running ``transform`` on ``grad_fn``'s gradients (default:
    ``value_and_grad(loss_fn)``)."""
    step_fn = grad_fn or value_and_grad(loss_fn)

    def update(params: Tree, client_state: dict[str, Any], broadcast: dict[str, Tree],
               batches: dict[str, torch.Tensor], step_mask: torch.Tensor, key: int) -> ClientResult:
        p, metrics = run_steps(step_fn, transform, params, batches, step_mask,
                               {"broadcast": broadcast, "key": key})
        return ClientResult(T.sub(p, params), {}, client_state, metrics)

    return ClientUpdate(update, loss_fn, transform if grad_fn is None else None)


def run_steps(grad_fn, transform: Transform, params: Tree, batches: dict[str, torch.Tensor],
              step_mask: torch.Tensor, ctx: dict, first: tuple | None = None) -> tuple[Tree, dict]:
    """The masked local steps: ``(final params, metrics)``. Step ``s`` runs ``transform`` on
    ``grad_fn``'s gradient (``value_and_grad`` or another estimator, e.g. DP-SGD's) only where
    ``step_mask[s]`` is true; local corrections are transforms in ``transform``'s chain
    (``proximal``, ``shift``: SCAFFOLD's and FedaGrac's). Buffers (``grad_fn.buffers``) are not
    trained: each active step replaces them with those its forward pass updated. ``first``:
    ``value_and_grad``'s output for step 0, if already computed (FedaGrac needs it before it
    can form its calibration)."""
    names = grad_fn.buffers if isinstance(grad_fn, GradFn) else ()
    p, b = split_buffers(params, names) if names else (params, {})
    opt_state = transform.init(p)
    loss_sum = torch.zeros((), dtype=_dtype(params))
    seen = torch.zeros((), dtype=_dtype(params))
    for s in range(batches["y"].shape[0]):  # (S, B, ...)
        if s == 0 and first is not None:
            grads, loss, new_b = first
        else:
            grads, loss, new_b = grad_fn({**p, **b} if b else p, step_of(batches, s))
        if b:
            grads = {k: grads[k] for k in p}
        updates, new_state = transform.update(grads, opt_state, p, ctx)
        active = step_mask[s]
        p = T.where(active, apply_updates(p, updates), p)
        if b:
            b = T.where(active, new_b, b)
        opt_state = tree_map(lambda a, b: torch.where(active, a, b), new_state, opt_state)
        n = batches["mask"][s].sum().to(loss.dtype) * active.to(loss.dtype)
        loss_sum = loss_sum + loss.detach() * n
        seen = seen + n
    metrics = {"loss": loss_sum / seen.clamp(min=1.0), "samples": seen, "steps": step_mask.sum()}
    return ({k: p[k] if k in p else b[k] for k in params} if b else p), metrics


def step_of(batches: dict[str, torch.Tensor], s: int) -> dict[str, torch.Tensor]:
    """Step ``s``'s slice of the batches (every entry has a leading step axis)."""
    return {k: v[s] for k, v in batches.items()}


def _dtype(tree: Tree) -> torch.dtype:
    return next(iter(tree.values())).dtype
