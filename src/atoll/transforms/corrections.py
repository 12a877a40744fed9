"""Local corrections: transforms that reshape a client's gradient before its optimizer.

A correction goes *before* the optimizer in a chain, e.g. ``chain(proximal(0.1), sgd(0.05))``,
so the optimizer sees the corrected gradient. Like every transform it is pure tensor code
(vmap- and grad-safe) and keeps its state in a dict of tensors.
"""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.transforms.base import Transform
from atoll.tree import Tree


def proximal(mu: float) -> Transform:
    """FedProx proximal term (Li et al. 2020, "Federated Optimization in Heterogeneous
    Networks"): the client minimises ``f(w) + (mu/2) ||w - w_anchor||^2``.

    ``init(params)`` stores ``anchor``, a detached copy of ``params`` (the global model at the
    start of local training); ``update`` returns ``g + mu * (w - anchor)``, the gradient of that
    objective, and leaves the state unchanged. ``mu = 0`` is the identity.
    """
    if mu < 0:
        raise ValueError(f"proximal: mu must be >= 0, got {mu}")

    def init(params):
        return {"anchor": T.clone(params)}

    def update(grads, state, params, ctx):
        anchor = state["anchor"]
        return {k: g + mu * (params[k] - anchor[k]) for k, g in grads.items()}, state

    return Transform(init, update, ("proximal", float(mu)))


def shift(c: Tree) -> Transform:
    """Add the constant tree ``c`` to the gradient (entries of the gradient only): SCAFFOLD's
    control-variate correction ``c - c_i`` and FedaGrac's calibration, built per client and
    round from what the client holds, chained before its optimizer."""

    def update(grads, state, params, ctx):
        return {k: g + c[k] for k, g in grads.items()}, state

    return Transform(lambda params: (), update, ())


def frozen(names) -> Transform:
    """Zero the updates of ``names`` (chained after the optimizer: those entries stay exact)."""
    names = frozenset(names)

    def update(updates, state, params, ctx):
        return {k: torch.zeros_like(u) if k in names else u for k, u in updates.items()}, state

    return Transform(lambda params: (), update, ())
