"""Optimizers as ``Transform`` s: SGD/momentum, Adam, Yogi, Adagrad, weight decay.

Invariants shared by every optimizer here:

* ``update`` returns ``-lr * direction`` (updates are *added* to the parameters).
* The state is a dict of tensors (trees and a scalar ``step`` counter), so it can be stacked
  along a client axis, masked with ``torch.where`` and checkpointed.
* The code is pure tensor code: no ``.item()``, no Python branches on tensor values, no in-place
  ops, so it runs under ``torch.func.vmap`` and ``torch.func.grad``. First-step special cases
  are ``torch.where`` on the step counter. Python branches only ever test hyperparameters.

Conventions: with default flags ``sgd``, ``adam`` and ``adagrad`` reproduce ``torch.optim.SGD``,
``torch.optim.Adam`` and ``torch.optim.Adagrad`` step for step. ``adam(bias_correction=False)``,
``yogi`` and ``adagrad(b1>0)`` are the server rules FedAdam, FedYogi and FedAdagrad of Reddi et
al. 2021, "Adaptive Federated Optimization" (Algorithm 2), where ``eps`` is their ``tau`` and
the second moment starts at ``tau^2`` (``initial_v`` / ``initial_accumulator_value``).
"""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.transforms.base import Transform
from atoll.tree import Tree


def _step0() -> torch.Tensor:
    """A fresh step counter: a float scalar (exact up to 2**24 steps), stackable with the rest."""
    return torch.zeros(())


def _with_decay(grads: Tree, params: Tree, weight_decay: float) -> Tree:
    """``g + wd * p`` (L2 penalty folded into the gradient, as ``torch.optim`` does)."""
    if weight_decay == 0.0:
        return grads
    return {k: g + weight_decay * params[k] for k, g in grads.items()}


def _check(**hyper: float) -> None:
    for name, value in hyper.items():
        if value < 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def add_decayed_weights(weight_decay: float) -> Transform:
    """Add ``weight_decay * params`` to the incoming gradients (stateless; chain it first)."""
    _check(weight_decay=weight_decay)

    def update(grads, state, params, ctx):
        return _with_decay(grads, params, weight_decay), state

    return Transform(lambda params: {}, update, ("decay", float(weight_decay)))


def sgd(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0) -> Transform:
    """Stochastic gradient descent with ``torch.optim.SGD`` semantics.

    ``d = g + wd * p``; with momentum the buffer is ``d`` at the first step and
    ``momentum * buf + (1 - dampening) * d`` after; the direction is ``buf``, or
    ``d + momentum * buf`` with Nesterov (Sutskever et al. 2013). Update: ``-lr * direction``.
    """
    _check(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")

    def init(params):
        if momentum == 0.0:
            return {"step": _step0()}
        return {"step": _step0(), "buf": T.zeros_like(params)}

    def update(grads, state, params, ctx):
        d = _with_decay(grads, params, weight_decay)
        step = state["step"] + 1
        if momentum == 0.0:
            return T.scale(d, -lr), {"step": step}
        first = state["step"] == 0
        buf = {k: torch.where(first, g, momentum * state["buf"][k] + (1.0 - dampening) * g)
               for k, g in d.items()}
        direction = T.axpy(momentum, buf, d) if nesterov else buf
        return T.scale(direction, -lr), {"step": step, "buf": buf}

    return Transform(init, update, ("sgd", float(lr), float(momentum), float(dampening),
                                    bool(nesterov), float(weight_decay)))


def momentum(lr: float, beta: float = 0.9, nesterov: bool = False) -> Transform:
    """Heavy-ball (Polyak 1964) or Nesterov momentum: ``sgd(lr, momentum=beta, nesterov=...)``."""
    return sgd(lr, momentum=beta, nesterov=nesterov)


def _moments(d: Tree, state: dict, b1: float, b2: float) -> tuple[Tree, Tree]:
    """Adam's exponential moving averages ``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``."""
    m = {k: b1 * state["m"][k] + (1.0 - b1) * g for k, g in d.items()}
    v = {k: b2 * state["v"][k] + (1.0 - b2) * g * g for k, g in d.items()}
    return m, v


def adam(lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, bias_correction: bool = True, initial_v: float = 0.0) -> Transform:
    """Adam (Kingma & Ba 2015); ``m`` starts at zero, ``v`` at ``initial_v`` (zero by default).

    ``bias_correction=True`` is ``torch.optim.Adam``:
    ``-lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
    ``bias_correction=False, initial_v=tau**2`` is FedAdam (Reddi et al. 2021, Algorithm 2:
    ``v_{-1} = tau^2``): ``-lr * m / (sqrt(v) + eps)``.
    """
    _check(lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, initial_v=initial_v)

    def init(params):
        v = {k: torch.full_like(p, initial_v) for k, p in params.items()}
        return {"step": _step0(), "m": T.zeros_like(params), "v": v}

    def update(grads, state, params, ctx):
        d = _with_decay(grads, params, weight_decay)
        step = state["step"] + 1
        m, v = _moments(d, state, b1, b2)
        updates = {}
        for k in m:
            if bias_correction:
                t = step.to(m[k].dtype)
                bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
                updates[k] = -(lr / bc1) * m[k] / (torch.sqrt(v[k]) / torch.sqrt(bc2) + eps)
            else:
                updates[k] = -lr * m[k] / (torch.sqrt(v[k]) + eps)
        return updates, {"step": step, "m": m, "v": v}

    return Transform(init, update)


def yogi(lr: float = 1e-2, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
         initial_v: float = 1e-6) -> Transform:
    """FedYogi (Reddi et al. 2021; Yogi: Zaheer et al. 2018), no bias correction.

    ``m = b1 m + (1-b1) g``; ``v = v - (1-b2) g^2 sign(v - g^2)`` (an additive step, so ``v``
    grows or shrinks by at most ``(1-b2) g^2``); update ``-lr * m / (sqrt(v) + eps)``.
    ``m`` starts at zero, ``v`` at ``initial_v`` (``tau^2`` in the paper).
    """
    _check(lr=lr, b1=b1, b2=b2, eps=eps, initial_v=initial_v)

    def init(params):
        v = {k: torch.full_like(p, initial_v) for k, p in params.items()}
        return {"step": _step0(), "m": T.zeros_like(params), "v": v}

    def update(grads, state, params, ctx):
        m = {k: b1 * state["m"][k] + (1.0 - b1) * g for k, g in grads.items()}
        v = {}
        for k, g in grads.items():
            g2, v0 = g * g, state["v"][k]
            v[k] = v0 - (1.0 - b2) * g2 * torch.sign(v0 - g2)
        updates = {k: -lr * m[k] / (torch.sqrt(v[k]) + eps) for k in m}
        return updates, {"step": state["step"] + 1, "m": m, "v": v}

    return Transform(init, update)


def adagrad(lr: float = 1e-2, eps: float = 1e-10, initial_accumulator_value: float = 0.0,
            b1: float = 0.0, weight_decay: float = 0.0) -> Transform:
    """Adagrad (Duchi et al. 2011): ``sum += d^2``, update ``-lr * m / (sqrt(sum) + eps)``.

    With ``b1 = 0``, ``m = d`` and this is ``torch.optim.Adagrad`` (``lr_decay = 0``). With
    ``b1 > 0`` it is FedAdagrad (Reddi et al. 2021): ``m = b1 m + (1-b1) d``, ``m`` from zero.
    ``d = g + wd * p``; the accumulator starts at ``initial_accumulator_value``.
    """
    _check(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value, b1=b1,
           weight_decay=weight_decay)

    def init(params):
        acc = {k: torch.full_like(p, initial_accumulator_value) for k, p in params.items()}
        state = {"step": _step0(), "sum": acc}
        if b1 > 0.0:
            state["m"] = T.zeros_like(params)
        return state

    def update(grads, state, params, ctx):
        d = _with_decay(grads, params, weight_decay)
        acc = {k: state["sum"][k] + g * g for k, g in d.items()}
        new_state = {"step": state["step"] + 1, "sum": acc}
        m = d
        if b1 > 0.0:
            m = {k: b1 * state["m"][k] + (1.0 - b1) * g for k, g in d.items()}
            new_state["m"] = m
        updates = {k: -lr * m[k] / (torch.sqrt(acc[k]) + eps) for k in m}
        return updates, new_state

    return Transform(init, update)
