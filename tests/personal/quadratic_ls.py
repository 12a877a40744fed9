"""Least-squares clients with closed-form optima: f_i(w) = 1/(2 m_i) ||A_i w - b_i||^2.

Client i holds the ``m_i`` rows of ``[A_i, b_i]`` as its samples (features ``x = [a_j, b_j]``)
and trains full batch (``batch_size >= m_i``), so every local step is an exact gradient step.
``H_i = A_i^T A_i / m_i`` is a full (non-diagonal) matrix with eigenvalues in [0.5, 2.5], and
``x_i = H_i^-1 A_i^T b_i / m_i`` is the client's own optimum: ``grad f_i(w) = H_i (w - x_i)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atoll.data import ClientData
from atoll.runtime.base import LocalWork
from atoll.runtime.loop import LoopRuntime

D = 3
M = [4, 5, 6, 5]  # samples per client: the server's weights p_i = m_i / sum m


def loss_fn(params, x, y, mask):
    per = 0.5 * (x[..., :D] @ params["w"] - x[..., D]) ** 2
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp(min=1.0)


@dataclass(frozen=True)
class Data:
    clients: list


def data() -> Data:
    g = torch.Generator().manual_seed(16)
    clients = []
    for m in M:
        u, _, vt = torch.linalg.svd(torch.randn(m, D, generator=g, dtype=torch.float64), full_matrices=False)
        h = 0.5 + 2.0 * torch.rand(D, generator=g, dtype=torch.float64)
        a = u @ torch.diag((m * h).sqrt()) @ vt  # A^T A / m = V diag(h) V^T
        b = 2.0 * torch.randn(m, 1, generator=g, dtype=torch.float64)
        x = torch.cat([a, b], 1)
        clients.append(ClientData(x, torch.zeros(m, dtype=torch.long), x[:0], torch.zeros(0, dtype=torch.long)))
    return Data(clients)


def hessians() -> list[torch.Tensor]:
    return [c.x[:, :D].T @ c.x[:, :D] / len(c.y) for c in data().clients]


def own_optima() -> list[torch.Tensor]:
    return [torch.linalg.solve(h, c.x[:, :D].T @ c.x[:, D] / len(c.y))
            for h, c in zip(hessians(), data().clients)]


def weights() -> torch.Tensor:
    p = torch.tensor(M, dtype=torch.float64)
    return p / p.sum()


def fixed_point(curvatures, lr: float, steps) -> torch.Tensor:
    """Where FedAvg stops when client i's local step is ``w <- w - lr C_i (w - x_i)``: after
    ``K_i`` steps its delta is ``G_i (x_i - w)`` with ``G_i = I - (I - lr C_i)^K_i``, and
    ``sum_i p_i G_i (x_i - w) = 0``."""
    eye = torch.eye(D, dtype=torch.float64)
    gs = [eye - torch.linalg.matrix_power(eye - lr * c, k) for c, k in zip(curvatures, steps)]
    lhs = sum(p * g for p, g in zip(weights(), gs))
    rhs = sum(p * g @ x for p, g, x in zip(weights(), gs, own_optima()))
    return torch.linalg.solve(lhs, rhs)


@dataclass(frozen=True)
class FixedSteps:
    steps: tuple

    def __call__(self, cid, round, seed, n):  # noqa: A002
        return self.steps[cid]


def work(steps) -> LocalWork:
    return LocalWork(batch_size=max(M), epochs=None, steps=1, schedule=FixedSteps(tuple(steps)))


def train(algorithm, rounds: int, steps, runtime=None):
    """Full participation from w = 0 for ``rounds`` rounds: ``(server state, client states)``."""
    runtime, d = runtime or LoopRuntime(), data()
    state = algorithm.init({"w": torch.zeros(D, dtype=torch.float64)})
    update, cstates = algorithm.client(loss_fn), {}
    for _ in range(rounds):
        state, cstates, stats = runtime.run_round(algorithm, update, state, cstates,
                                                  list(range(len(M))), d, work(steps), 0)
        assert stats.succeeded == len(M), stats.failures
    return state, cstates
