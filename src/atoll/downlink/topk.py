"""The server update of US 2025/0265475 A1 ([0116] and [0124]-[0126], claims 1-3): apply only
the ``k`` largest aggregated gradients and keep the rest for later rounds.

``server_topk(fraction | k=, momentum=rho)`` is a ``Transform`` for the server optimizer chain:

    m_t   = rho * m_{t-1} + g_t                 (g_t: the aggregated pseudo-gradient; m_t = g_t if rho = 0)
    a_t   = m_t + err_{t-1}
    out_t = top_k(a_t)                          (the k entries of largest magnitude, over all leaves)
    err_t = a_t - out_t                         (what was not applied this round)

``out_t`` goes on to the next transform, e.g. ``chain(server_topk(0.01), sgd(1.0))``, so only
``k`` coordinates of the global model change per round, which is what makes the per-client
downlink deltas of ``atoll.downlink.DeltaTracker`` sparse. Invariants (tested): nothing is lost,
``sum_t out_t + err_T == sum_t m_t`` (``== sum_t g_t`` when ``rho = 0``); with ``k = d`` and
``rho = 0`` the output is the input, so ``chain(server_topk(k=d), sgd(1.0))`` is FedAvg. State:
``{"momentum": tree, "err": tree}`` like the parameters.
"""
from __future__ import annotations

import torch

from atoll.codecs.flat import check_fraction, kept
from atoll.transforms.base import Transform


def server_topk(fraction: float | None = None, *, k: int | None = None, momentum: float = 0.0) -> Transform:
    """Apply the top ``k`` (or ``fraction`` of all coordinates) of momentum + residual."""
    if (fraction is None) == (k is None):
        raise ValueError("server_topk: give exactly one of fraction and k")
    if fraction is not None:
        check_fraction(fraction, "server_topk")
    elif not (isinstance(k, int) and k >= 1):
        raise ValueError(f"server_topk: k must be an integer >= 1, got {k!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"server_topk: momentum must be in [0, 1), got {momentum}")

    def init(params):
        return {"momentum": {n: torch.zeros_like(v) for n, v in params.items()},
                "err": {n: torch.zeros_like(v) for n, v in params.items()}}

    def update(grads, state, params, ctx):
        m = grads if momentum == 0.0 else {n: momentum * state["momentum"][n] + g for n, g in grads.items()}
        acc = {n: m[n] + state["err"][n] for n in m}
        vec = torch.cat([v.reshape(-1) for v in acc.values()])
        count = min(k, vec.numel()) if k is not None else kept(fraction, vec.numel())
        mask = torch.zeros(vec.numel(), dtype=torch.bool)
        mask[torch.topk(vec.abs(), count, sorted=False).indices] = True
        out, err, i = {}, {}, 0
        for n, v in acc.items():
            sel = mask[i:i + v.numel()].reshape(v.shape)
            out[n] = torch.where(sel, v, torch.zeros((), dtype=v.dtype))
            err[n] = torch.where(sel, torch.zeros((), dtype=v.dtype), v)
            i += v.numel()
        return out, {"momentum": m, "err": err}

    return Transform(init, update)
