"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization"): normalised averaging.

Client i runs its ``K_i`` local steps of SGD (momentum ``rho`` allowed) and sends its delta
and ``a_i = ||a_i||_1``, the sum of the weights its local gradients carry in the delta
(``K_i`` for plain SGD; ``[K - rho (1 - rho^K)/(1 - rho)]/(1 - rho)`` with momentum). The
server averages the normalised deltas ``d_i = delta_i / a_i`` and rescales by the effective
step count ``tau_eff = sum_i p_i a_i``: ``x <- x + server_lr * tau_eff * sum_i p_i d_i``.
This removes FedAvg's bias towards clients that run more steps to first order in the local
learning rate (the fixed point still moves by O(lr); see docs/heterogeneity.md).
"""
from __future__ import annotations

import math

from atoll import tree as T
from atoll.algorithm import Algorithm
from atoll.client import local_training
from atoll.transforms import Transform, sgd
from atoll.types import ClientResult


def _norm_a(k, rho: float):
    if rho == 0.0:
        return k
    return (k - rho * (1 - rho ** k) / (1 - rho)) / (1 - rho)


def _aux_spec(params) -> dict:
    """``a``: a scalar of at least 1 (one local step: ``_norm_a(1, rho) = 1``); a smaller ``a``
    would multiply that client's delta by ``tau_eff / a`` on the server."""
    return {"a": ((), None, 1.0, math.inf)}


def fednova(local_opt: Transform | None = None, server_lr: float = 1.0, momentum: float = 0.0,
            **parts) -> Algorithm:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"fednova: momentum must be in [0, 1), got {momentum}")

    def client_fn(loss_fn, opt, grad_fn=None):
        inner = local_training(loss_fn, opt, grad_fn)

        def update(params, client_state, broadcast, batches, step_mask, key):
            res = inner(params, client_state, broadcast, batches, step_mask, key)
            k = res.metrics["steps"].to(next(iter(params.values())).dtype)
            return ClientResult(res.delta, {"a": _norm_a(k, momentum)}, res.client_state, res.metrics)

        return update

    def server_fn(state, agg, deltas, weights, aux, key, extra):
        p = weights / weights.sum()
        a = aux["a"].to(p.dtype).clamp(min=1e-12)
        tau_eff = (p * a).sum()
        return T.weighted_sum(deltas, p * tau_eff / a), extra

    return Algorithm("fednova", local_opt or sgd(0.05), sgd(server_lr), client_fn=client_fn,
                     server_fn=server_fn, aux_spec=_aux_spec, **parts)
