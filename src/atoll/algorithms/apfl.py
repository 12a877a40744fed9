"""APFL (Deng et al. 2020, "Adaptive Personalized Federated Learning"): each client keeps a
local model ``v_i`` and a mixing weight ``alpha_i``; its personalized model is
``alpha_i v_i + (1 - alpha_i) w``.

Every local step updates the copy of the global model ``w`` on ``f_i(w)`` (FedAvg: its delta
goes up), ``v_i`` on ``f_i(alpha v + (1 - alpha) w)`` with ``w`` held fixed, and ``alpha_i`` on
the same mixed loss (gradient ``<grad f_i(mix), v - w>``), all with the local optimizer: one
step of ``run_steps`` on the joint loss ``f_i(w) + f_i(alpha v + (1 - alpha) stop_grad(w))``,
whose gradient is exactly those three, ``alpha``'s scaled by ``alpha_step`` (its learning
rate relative to the local one: the paper's separate step size). ``alpha_i`` is kept in [0, 1] after each round. With one
local step per round, on a quadratic ``f_i``, the personalized model's fixed point is the
client's own optimum (where ``alpha_i > 0``), ``w`` FedAvg's (with more steps the mixed model
is evaluated along the local path of ``w``, and the fixed point moves with it). Models with buffers (BatchNorm) and DP-SGD's estimator are
refused: the joint loss is plain autograd on the model's loss.
"""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.algorithm import Algorithm
from atoll.client import ModelLoss, run_steps, value_and_grad
from atoll.transforms import Transform, sgd
from atoll.types import ClientResult


def apfl(local_opt: Transform | None = None, alpha: float = 0.25, alpha_step: float = 0.1,
         server_lr: float = 1.0, **parts) -> Algorithm:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"apfl: alpha must be in [0, 1], got {alpha}")
    if alpha_step < 0:
        raise ValueError(f"apfl: alpha_step must be >= 0, got {alpha_step}")

    def client_fn(loss_fn, opt, grad_fn=None):
        if grad_fn is not None or isinstance(loss_fn, ModelLoss) and loss_fn.buffers:
            raise ValueError("apfl: needs the plain gradient of a model without buffers "
                             "(no DP-SGD estimator, no BatchNorm)")
        step_fn = value_and_grad(_joint(loss_fn, alpha_step))

        def update(params, client_state, broadcast, batches, step_mask, key):
            start = {**{f"w/{k}": v for k, v in params.items()},
                     **{f"v/{k}": v for k, v in _local(params, client_state).items()},
                     "alpha": client_state["alpha"]}
            p, metrics = run_steps(step_fn, opt, start, batches, step_mask,
                                   {"broadcast": broadcast, "key": key})
            w, v = _part(p, "w/"), _part(p, "v/")
            state = {**client_state, "v": v, "alpha": p["alpha"].clamp(0.0, 1.0),
                     "seen": torch.ones_like(client_state["seen"])}
            return ClientResult(T.sub(w, params), {}, state, metrics)

        return update

    def client_init(params):
        dtype = next(iter(params.values())).dtype
        return {"v": T.zeros_like(params), "alpha": torch.tensor(float(alpha), dtype=dtype),
                "seen": torch.zeros((), dtype=dtype)}

    return Algorithm("apfl", local_opt or sgd(0.05), sgd(server_lr), client_fn=client_fn,
                     client_init=client_init, personalize=personal_model, **parts)


def _joint(loss_fn, alpha_step):
    def joint(tree, x, y, mask):
        raw = tree["alpha"]
        a = raw.detach() + alpha_step * (raw - raw.detach())  # value alpha, gradient scaled
        w, v = _part(tree, "w/"), _part(tree, "v/")
        mix = {k: a * v[k] + (1 - a) * w[k].detach() for k in w}
        return loss_fn(w, x, y, mask) + loss_fn(mix, x, y, mask)

    return joint


def _part(tree, prefix: str):
    return {k[len(prefix):]: v for k, v in tree.items() if k.startswith(prefix)}


def _local(params, client_state):
    """``v_i``: the global model the client first receives, its own after."""
    return T.where(client_state["seen"] > 0, client_state["v"], params)


def personal_model(params, client_state):
    """``alpha_i v_i + (1 - alpha_i) w`` with the global ``w``."""
    a, v = client_state["alpha"], _local(params, client_state)
    return {k: a * v[k] + (1 - a) * w for k, w in params.items()}
