"""FedaGrac: gradient calibration for clients that run different numbers of local steps
(seed 003, CN 112990488 B; Wu et al., arXiv 2112.09355).

The server sends the global model ``x~`` and the global gradient ``v~`` (zero before the
first round). Client i computes ``v_i``, the stochastic gradient at its start point ``x~`` on
its first local batch (the seed's ``g_{t,0}^i``: the gradient of step 0, so it costs nothing
extra; with full-batch steps it is ``grad f_i(x~)``), forms the calibration

* ``form = "seed"`` (the patent's claim 1):
  ``c = v~ - v_i + lam / (lr * K_i) * (x~ - x_i^prev)``, where ``x_i^prev`` is the client's
  final local model from its previous participation (the term is zero for a first-time
  client), default ``lam = 0.1``;
* ``form = "published"`` (the authors' code): ``c = lam * (v~ - v_i)``, default ``lam = 1``
  (``lam = 0`` is FedAvg),

runs ``K_i`` steps ``x <- x - lr * (g + c)`` and sends ``v_i`` and its final model (as a
delta). The server sets ``x~ = sum_i w_i x_i`` and ``v~ = sum_i w_i v_i`` with the
aggregator's normalised weights. Client state: ``x_prev`` and the flag ``seen``.
"""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.algorithm import Algorithm, like_params
from atoll.algorithms._local import result, steps_taken
from atoll.client import run_steps, value_and_grad
from atoll.transforms import Transform, sgd

FORMS = ("seed", "published")


def fedagrac(local_opt: Transform | None = None, server_lr: float = 1.0, local_lr: float = 0.05,
             lam: float | None = None, form: str = "seed", **parts) -> Algorithm:
    if form not in FORMS:
        raise ValueError(f"fedagrac: form must be one of {FORMS}, got {form!r}")
    lam = (0.1 if form == "seed" else 1.0) if lam is None else float(lam)
    if lam < 0:
        raise ValueError(f"fedagrac: lam must be >= 0, got {lam}")
    if local_lr <= 0:
        raise ValueError(f"fedagrac: local_lr must be > 0, got {local_lr}")

    def client_fn(loss_fn, opt):
        grad_fn = value_and_grad(loss_fn)

        def update(params, client_state, broadcast, batches, step_mask, key):
            if batches["y"].shape[0] == 0:  # no local step (a client without data): no v_i
                zero = torch.zeros((), dtype=next(iter(params.values())).dtype)
                return result(params, params, T.zeros_like(params), client_state,
                              {"loss": zero, "samples": zero, "steps": step_mask.sum()})
            v_i, loss0, b0 = grad_fn(params, batches["x"][0], batches["y"][0], batches["mask"][0])
            v_i = T.detach(v_i)
            drift = T.sub(broadcast["vtilde"], v_i)
            if form == "published":
                c = T.scale(drift, lam)
            else:
                k = steps_taken(step_mask, next(iter(params.values())).dtype)
                gap = T.sub(params, client_state["x_prev"])
                c = T.axpy(client_state["seen"] * lam / (local_lr * k), gap, drift)
            final, metrics = run_steps(grad_fn, opt, params, batches, step_mask,
                                       {"broadcast": broadcast, "key": key}, correction=c,
                                       first=(v_i, loss0, b0))
            state = {**client_state, "x_prev": final, "seen": torch.ones_like(client_state["seen"])}
            return result(params, final, v_i, state, metrics)

        return update

    def client_init(params):
        return {"x_prev": T.zeros_like(params),
                "seen": torch.zeros((), dtype=next(iter(params.values())).dtype)}

    def server_fn(state, agg, deltas, weights, aux, key, extra):
        vtilde = T.weighted_sum(aux, weights / weights.sum())
        return agg, {**extra, "broadcast": {**extra["broadcast"], "vtilde": vtilde}}

    return Algorithm(f"fedagrac-{form}", local_opt or sgd(local_lr), sgd(server_lr),
                     client_fn=client_fn, client_init=client_init, server_fn=server_fn, aux_spec=like_params,
                     server_init=lambda params: {"broadcast": {"vtilde": T.zeros_like(params)}},
                     **parts)
