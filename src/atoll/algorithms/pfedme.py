"""pFedMe (Dinh, Tran, Nguyen 2020, "Personalized Federated Learning with Moreau Envelopes",
NeurIPS): each client keeps a personal model ``theta_i`` in its client state.

Every local step (batch D) client i first solves the Moreau-envelope problem
``min_theta f_i(theta; D) + lam/2 ||theta - w||^2`` approximately, ``inner_steps`` (K) steps
of gradient descent with step ``inner_lr`` from its current ``theta_i``, then moves its local
copy of the global model along the envelope's gradient, ``w <- w - eta lam (w - theta_i)``
(``eta``: the local optimizer). The delta of ``w`` goes up; the server is FedAvg's with
``server_lr`` as the paper's mixing ``beta`` (``w <- (1 - beta) w + beta mean(w_i)``).
Personalized model: ``theta_i``.

``theta_i`` is a buffer of the step loop (``client.run_steps`` replaces it each active step)
and is kept across rounds (warm start; the paper's code restarts it from the received model
each round). On a quadratic ``f_i`` with Hessian ``H_i`` and one local step per round, any
``K`` reaches the exact fixed point ``theta_i* = argmin f_i(theta) + lam/2 ||theta - w*||^2``,
``w*`` FedAvg's fixed point on the envelopes ``F_i`` (quadratics with Hessian
``lam H_i (H_i + lam)^-1``). Models with buffers (BatchNorm) and DP-SGD's estimator are refused.
"""
from __future__ import annotations

import torch
from torch.func import grad_and_value

from atoll import tree as T
from atoll.algorithm import Algorithm
from atoll.algorithms._local import part, prefixed, refuse_extras
from atoll.client import run_steps
from atoll.transforms import Transform, sgd
from atoll.types import ClientResult, GradFn


def pfedme(local_opt: Transform | None = None, lam: float = 15.0, inner_steps: int = 5,
           inner_lr: float = 0.05, server_lr: float = 1.0, **parts) -> Algorithm:
    if lam <= 0:
        raise ValueError(f"pfedme: lam must be > 0, got {lam}")
    if inner_steps < 1 or inner_lr <= 0:
        raise ValueError(f"pfedme: inner_steps must be >= 1 and inner_lr > 0, got "
                         f"{inner_steps} and {inner_lr}")

    def client_fn(loss_fn, opt, grad_fn=None):
        refuse_extras("pfedme", loss_fn, grad_fn)
        step_fn = _envelope_step(grad_and_value(loss_fn), lam, inner_steps, inner_lr)

        def update(params, client_state, broadcast, batches, step_mask, key):
            start = {**prefixed("w/", params), **prefixed("theta/", personal_model(params, client_state))}
            p, metrics = run_steps(GradFn(step_fn, tuple(f"theta/{k}" for k in params)), opt, start,
                                   batches, step_mask, {"broadcast": broadcast, "key": key})
            state = {**client_state, "theta": part(p, "theta/"), "seen": torch.ones_like(client_state["seen"])}
            return ClientResult(T.sub(part(p, "w/"), params), {}, state, metrics)

        return update

    return Algorithm("pfedme", local_opt or sgd(0.05), sgd(server_lr), client_fn=client_fn,
                     client_init=_init, personalize=personal_model, **parts)


def _envelope_step(g, lam, inner_steps, inner_lr):
    """``(p, step) -> (grads, loss, new buffers)`` on ``p = {w/..., theta/...}``: K steps on
    ``f_i(theta) + lam/2 ||theta - w||^2``, then ``w``'s gradient ``lam (w - theta)`` and the new
    ``theta`` as the buffers. ``loss``: ``f_i`` at ``theta`` before the inner steps."""

    def step_fn(p, step):
        w, theta, loss = part(p, "w/"), part(p, "theta/"), None
        for _ in range(inner_steps):
            grads, value = g(theta, step["x"], step["y"], step["mask"])
            loss = value if loss is None else loss
            theta = {k: t - inner_lr * (grads[k] + lam * (t - w[k])) for k, t in theta.items()}
        return ({f"w/{k}": lam * (v - theta[k]) for k, v in w.items()}, loss, prefixed("theta/", theta))

    return step_fn


def _init(params):
    """``theta_i`` starts as the global model the client first receives (``seen = 0`` until
    then, as Ditto's ``v_i``)."""
    return {"theta": T.zeros_like(params),
            "seen": torch.zeros((), dtype=next(iter(params.values())).dtype)}


def personal_model(params, client_state):
    """``theta_i`` (the global ``params`` before the client's first round)."""
    return T.where(client_state["seen"] > 0, client_state["theta"], params)
