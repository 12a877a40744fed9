"""FedaGrac: gradient calibration for clients that run different numbers of local steps
(CN 112990488 B; Wu et al., arXiv 2112.09355 and its code, HarliWu/FedaGrac).

The server sends the global model ``x~`` and the global gradient ``v~`` (zero before the
first round). Client i runs ``K_i`` steps ``x <- x - lr * (g + c)`` with a constant
calibration ``c`` and sends its final model (as a delta) and gradient information; the server
sets ``x~ = sum_i w_i x_i`` and ``v~`` with the aggregator's normalised weights ``w_i``.

* ``form = "seed"`` (the patent's claim 1): ``v_i`` is the stochastic gradient at the start
  point ``x~`` on the first local batch (the seed's ``g_{t,0}^i``: the gradient of step 0, so it
  costs nothing extra); ``c = v~ - v_i + lam / (lr * K_i) * (x~ - x_i^prev)``, ``x_i^prev`` the
  client's final local model from its previous participation (the term is zero for a
  first-time client), default ``lam = 0.1``; the client sends ``v_i``, ``v~ = sum_i w_i v_i``.
  Client state: ``x_prev`` and the flag ``seen``.
* ``form = "published"`` (the authors' code): ``c = lam * (v~ - mu_i)``, ``mu_i`` the mean of
  the client's raw local gradients over its ``K_i`` steps in its *previous* participation (zero
  before), default ``lam = 0.03`` (``lam = 0`` is FedAvg). The client sends this round's mean
  ``mu_i``, its first gradient ``g_{t,0}^i`` and ``K_i``; the server takes ``mu_i`` from the
  clients with ``K_i <= K_bar = sum_i w_i K_i`` and the first gradient from the others:
  ``v~ = sum_i w_i (mu_i if K_i <= K_bar else g_{t,0}^i)``. Client state: ``mu``.
"""
from __future__ import annotations

import math

import torch

from atoll import tree as T
from atoll.algorithm import Algorithm, like_params
from atoll.algorithms._local import result, steps_taken
from atoll.client import run_steps, step_of, value_and_grad
from atoll.types import GradFn
from atoll.transforms import Transform, chain, sgd, shift

FORMS = ("seed", "published")
SEED_LAM, PUBLISHED_LAM = 0.1, 0.03   # the patent's example; the authors' --lam default


def fedagrac(local_opt: Transform | None = None, server_lr: float = 1.0, local_lr: float = 0.05,
             lam: float | None = None, form: str = "seed", **parts) -> Algorithm:
    if form not in FORMS:
        raise ValueError(f"fedagrac: form must be one of {FORMS}, got {form!r}")
    lam = (SEED_LAM if form == "seed" else PUBLISHED_LAM) if lam is None else float(lam)
    if lam < 0:
        raise ValueError(f"fedagrac: lam must be >= 0, got {lam}")
    if local_lr <= 0:
        raise ValueError(f"fedagrac: local_lr must be > 0, got {local_lr}")
    seed = form == "seed"
    return Algorithm(f"fedagrac-{form}", local_opt or sgd(local_lr), sgd(server_lr),
                     client_fn=_seed_client(lam, local_lr) if seed else _published_client(lam),
                     client_init=_seed_init if seed else _published_init,
                     server_aux=_seed_server if seed else None,
                     server_fn=None if seed else _published_server,
                     server_init=lambda params: {"broadcast": {"vtilde": T.zeros_like(params)}},
                     aux_spec=like_params if seed else _published_aux, **parts)


def _dtype(params):
    return next(iter(params.values())).dtype


def _idle(params, client_state, step_mask, aux):
    """A client without data takes no local step and sends ``aux`` (zeros)."""
    zero = torch.zeros((), dtype=_dtype(params))
    return result(params, params, aux, client_state,
                  {"loss": zero, "samples": zero, "steps": step_mask.sum()})


def _seed_client(lam, local_lr):
    def client_fn(loss_fn, opt, grad_fn=None):
        grad_fn = grad_fn or value_and_grad(loss_fn)

        def update(params, client_state, broadcast, batches, step_mask, key):
            if batches["y"].shape[0] == 0:
                return _idle(params, client_state, step_mask, T.zeros_like(params))
            v_i, loss0, b0 = grad_fn(params, step_of(batches, 0))
            v_i = T.detach(v_i)
            k = steps_taken(step_mask, _dtype(params))
            gap = T.sub(params, client_state["x_prev"])
            c = T.axpy(client_state["seen"] * lam / (local_lr * k), gap,
                       T.sub(broadcast["vtilde"], v_i))
            final, metrics = run_steps(grad_fn, chain(shift(c), opt), params, batches, step_mask,
                                       {"broadcast": broadcast, "key": key},
                                       first=(v_i, loss0, b0))
            state = {**client_state, "x_prev": final, "seen": torch.ones_like(client_state["seen"])}
            return result(params, final, v_i, state, metrics)

        return update

    return client_fn


def _seed_init(params):
    return {"x_prev": T.zeros_like(params), "seen": torch.zeros((), dtype=_dtype(params))}


def _seed_server(state, agg, vtilde, cohort, extra):
    return agg, {**extra, "broadcast": {**extra["broadcast"], "vtilde": vtilde}}


def _published_client(lam):
    def client_fn(loss_fn, opt, grad_fn=None):
        grad_fn = grad_fn or value_and_grad(loss_fn)

        def update(params, client_state, broadcast, batches, step_mask, key):
            zeros = T.zeros_like(params)
            if batches["y"].shape[0] == 0:
                aux = {**T.join({"mean": zeros, "first": zeros}), "k": torch.zeros((), dtype=_dtype(params))}
                return _idle(params, client_state, step_mask, aux)
            g0, loss0, b0 = grad_fn(params, step_of(batches, 0))
            g0 = T.detach(g0)
            total, step = [T.where(step_mask[0], g0, zeros)], [1]

            def record(p, one):  # run_steps calls it once per step s = 1, 2, ...
                g, loss, new_b = grad_fn(p, one)
                total[0] = T.add(total[0], T.where(step_mask[step[0]], T.detach(g), zeros))
                step[0] += 1
                return g, loss, new_b

            recording = GradFn(record, grad_fn.buffers)
            c = T.scale(T.sub(broadcast["vtilde"], client_state["mu"]), lam)
            final, metrics = run_steps(recording, chain(shift(c), opt), params, batches, step_mask,
                                       {"broadcast": broadcast, "key": key},
                                       first=(g0, loss0, b0))
            k = steps_taken(step_mask, _dtype(params))
            mean = T.scale(total[0], 1 / k)
            aux = {**T.join({"mean": mean, "first": g0}), "k": k}
            return result(params, final, aux, {**client_state, "mu": mean}, metrics)

        return update

    return client_fn


def _published_aux(params):
    """``mean/...`` and ``first/...`` shaped like the model, ``k`` (local steps) >= 1."""
    return {**{f"{g}/{k}": v for g in ("mean", "first") for k, v in like_params(params).items()},
            "k": ((), None, 1.0, math.inf)}


def _published_init(params):
    return {"mu": T.zeros_like(params)}


def _published_server(state, agg, deltas, weights, aux, key, extra):
    w = weights / weights.sum()
    k = aux["k"].to(w.dtype)
    parts = T.split({n: v for n, v in aux.items() if n != "k"})
    below = (k <= (w * k).sum()).to(w.dtype)   # the authors' rule: K_i <= the round's mean K
    vtilde = T.add(T.weighted_sum(parts["mean"], w * below),
                   T.weighted_sum(parts["first"], w * (1 - below)))
    return agg, {**extra, "broadcast": {**extra["broadcast"], "vtilde": vtilde}}
