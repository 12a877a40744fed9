"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated
Learning"), option II control variates.

Server state: the global control variate ``c`` (broadcast with the model). Client state:
its own ``c_i`` (zero before its first round). Client i runs ``K_i`` local steps on
``g(y) - c_i + c`` with learning rate ``local_lr``, then sets
``c_i+ = c_i - c + (x - y) / (K_i * local_lr)`` and sends ``delta = y - x`` and
``dc_i = c_i+ - c_i``. The server steps ``x <- x + server_lr * mean_w(delta)`` and
``c <- c + (|S| / N) * mean_w(dc_i)``, with ``mean_w`` the aggregator's weights (the paper's
uniform mean under ``weighting = "uniform"``) and ``N = num_clients``. Option II assumes plain
SGD locally (``local_lr`` is its learning rate).
"""
from __future__ import annotations


from atoll import tree as T
from atoll.algorithm import Algorithm, like_params
from atoll.algorithms._local import result, steps_taken
from atoll.client import run_steps, value_and_grad
from atoll.transforms import Transform, chain, sgd, shift


def scaffold(local_opt: Transform | None = None, server_lr: float = 1.0, local_lr: float = 0.05,
             num_clients: int | None = None, **parts) -> Algorithm:
    if num_clients is None or num_clients < 1:
        raise ValueError(f"scaffold: num_clients (the federation's size N) must be >= 1, got {num_clients}")
    if local_lr <= 0:
        raise ValueError(f"scaffold: local_lr must be > 0, got {local_lr}")

    def client_fn(loss_fn, opt, grad_fn=None):
        grad_fn = grad_fn or value_and_grad(loss_fn)

        def update(params, client_state, broadcast, batches, step_mask, key):
            c, c_i = broadcast["c"], client_state["c_i"]
            final, metrics = run_steps(grad_fn, chain(shift(T.sub(c, c_i)), opt), params, batches,
                                       step_mask, {"broadcast": broadcast, "key": key})
            k = steps_taken(step_mask, next(iter(params.values())).dtype)
            delta = T.sub(final, params)
            new_ci = T.sub(T.sub(c_i, c), T.scale(delta, 1.0 / (k * local_lr)))
            return result(params, final, T.sub(new_ci, c_i), {**client_state, "c_i": new_ci}, metrics)

        return update

    def server_aux(state, agg, mean_dc, cohort, extra):
        c = T.axpy(cohort / num_clients, mean_dc, extra["broadcast"]["c"])
        return agg, {**extra, "broadcast": {**extra["broadcast"], "c": c}}

    return Algorithm("scaffold", local_opt or sgd(local_lr), sgd(server_lr), client_fn=client_fn,
                     client_init=lambda params: {"c_i": T.zeros_like(params)},
                     server_aux=server_aux, aux_spec=like_params,
                     server_init=lambda params: {"broadcast": {"c": T.zeros_like(params)}}, **parts)
