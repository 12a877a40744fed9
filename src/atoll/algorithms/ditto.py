"""Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization"): each client keeps a personal model ``v_i`` in its client state.

Every round client i (1) trains the received global model ``w`` as in FedAvg and sends its
delta, and (2) trains its personal model on the same batches on ``f_i(v) + lam/2 ||v - w||^2``,
anchored at the received ``w``. The server is FedAvg's; ``v_i`` never leaves the client.
On a quadratic ``f_i`` with FedAvg's fixed point ``w*``, the personal fixed point is
``v_i* = argmin f_i(v) + lam/2 ||v - w*||^2`` (``(a_i + lam w*) / (1 + lam)`` for
``f_i = 1/2 ||v - a_i||^2``). ``lam = 0``: local training only; ``lam -> inf``: FedAvg.
"""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.algorithm import Algorithm
from atoll.client import run_steps, value_and_grad
from atoll.transforms import Transform, chain, sgd
from atoll.types import ClientResult


def toward(anchor, lam: float) -> Transform:
    """``g + lam (v - anchor)``: the gradient of ``lam/2 ||v - anchor||^2`` added (gradient
    entries only: buffers are not trained)."""

    def update(grads, state, params, ctx):
        return {k: g + lam * (params[k] - anchor[k]) for k, g in grads.items()}, state

    return Transform(lambda params: (), update, ())


def ditto(local_opt: Transform | None = None, lam: float = 0.1, server_lr: float = 1.0,
          **parts) -> Algorithm:
    if lam < 0:
        raise ValueError(f"ditto: lam must be >= 0, got {lam}")

    def client_fn(loss_fn, opt, grad_fn=None):
        grad_fn = grad_fn or value_and_grad(loss_fn)

        def update(params, client_state, broadcast, batches, step_mask, key):
            ctx = {"broadcast": broadcast, "key": key}
            w, metrics = run_steps(grad_fn, opt, params, batches, step_mask, ctx)
            v, _ = run_steps(grad_fn, chain(toward(params, lam), opt),
                             personal_model(params, client_state), batches, step_mask, ctx)
            state = {**client_state, "personal": v, "seen": torch.ones_like(client_state["seen"])}
            return ClientResult(T.sub(w, params), {}, state, metrics)

        return update

    return Algorithm("ditto", local_opt or sgd(0.05), sgd(server_lr), client_fn=client_fn,
                     client_init=_init,
                     personalize=personal_model, **parts)


def _init(params):
    """``v_i`` starts as the global model the client first receives (``seen = 0`` until then:
    the state does not depend on when a runtime creates it)."""
    return {"personal": T.zeros_like(params),
            "seen": torch.zeros((), dtype=next(iter(params.values())).dtype)}


def personal_model(params, client_state):
    """The model client ``client_state`` uses: its own ``v_i`` (the global ``params`` before
    its first round)."""
    return T.where(client_state["seen"] > 0, client_state["personal"], params)
