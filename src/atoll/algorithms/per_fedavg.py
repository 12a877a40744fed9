"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar 2020, "Personalized Federated Learning with
Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS): FedAvg on the
MAML objective ``sum_i p_i f_i(w - alpha grad f_i(w))``.

Each local step takes the meta-gradient at ``w`` with the local optimizer (the paper's
``beta``): with ``theta = w - alpha grad f_i(w)``,

* ``variant = "fo"`` (first order): ``grad f_i(theta)``;
* ``variant = "hf"`` (Hessian-free): ``grad f_i(theta) - alpha d``, where
  ``d = (grad f_i(w + delta g) - grad f_i(w - delta g)) / (2 delta)`` with ``g = grad f_i(theta)``
  is the finite-difference Hessian-vector product (exact on a quadratic).

All gradients of a step use its batch (the paper draws independent batches D, D', D''; with
full batches they coincide). Personalized model: ``adapt_steps`` steps of gradient descent
with step ``alpha`` from the global model on the client's whole training split, made at
evaluation (``Algorithm.adapt``); no client state. On quadratics ``f_i`` with Hessians
``H_i`` and one local step per round, ``hf`` reaches the MAML objective's minimizer (its
Hessians are ``(I - alpha H_i) H_i (I - alpha H_i)``), ``fo`` the zero of
``sum_i p_i grad f_i(w - alpha grad f_i(w))``. Models with buffers and DP-SGD are refused.
"""
from __future__ import annotations

from torch.func import grad, grad_and_value

from atoll import tree as T
from atoll.algorithm import Algorithm
from atoll.algorithms._local import refuse_extras
from atoll.client import run_steps
from atoll.transforms import Transform, sgd
from atoll.types import ClientResult, GradFn


def per_fedavg(local_opt: Transform | None = None, alpha: float = 0.01, variant: str = "fo",
               delta: float = 1e-3, adapt_steps: int = 1, server_lr: float = 1.0,
               **parts) -> Algorithm:
    if alpha <= 0 or delta <= 0 or adapt_steps < 0:
        raise ValueError(f"per_fedavg: alpha and delta must be > 0 and adapt_steps >= 0, got "
                         f"{alpha}, {delta}, {adapt_steps}")
    if variant not in ("fo", "hf"):
        raise ValueError(f"per_fedavg: variant must be 'fo' or 'hf', got {variant!r}")

    def client_fn(loss_fn, opt, grad_fn=None):
        refuse_extras("per_fedavg", loss_fn, grad_fn)
        step_fn = GradFn(_meta_gradient(grad_and_value(loss_fn), alpha, variant == "hf", delta))

        def update(params, client_state, broadcast, batches, step_mask, key):
            w, metrics = run_steps(step_fn, opt, params, batches, step_mask,
                                   {"broadcast": broadcast, "key": key})
            return ClientResult(T.sub(w, params), {}, client_state, metrics)

        return update

    def adapt(loss_fn, params, x, y):
        """``adapt_steps`` steps of ``theta <- theta - alpha grad f_i(theta)`` on ``(x, y)``."""
        g, mask = grad(loss_fn), y.new_ones(y.shape, dtype=bool)
        for _ in range(adapt_steps):
            params = T.sub(params, T.scale(g(params, x, y, mask), alpha))
        return params

    return Algorithm("per_fedavg", local_opt or sgd(0.05), sgd(server_lr), client_fn=client_fn,
                     adapt=adapt, **parts)


def _meta_gradient(g, alpha, hessian_free, delta):
    """``(w, step) -> (meta-gradient, loss at w, {})``."""

    def step_fn(w, step):
        batch = (step["x"], step["y"], step["mask"])
        inner, loss = g(w, *batch)
        outer, _ = g({k: v - alpha * inner[k] for k, v in w.items()}, *batch)
        if hessian_free:
            plus, _ = g({k: v + delta * outer[k] for k, v in w.items()}, *batch)
            minus, _ = g({k: v - delta * outer[k] for k, v in w.items()}, *batch)
            outer = {k: o - alpha * (plus[k] - minus[k]) / (2 * delta) for k, o in outer.items()}
        return outer, loss, {}

    return step_fn
