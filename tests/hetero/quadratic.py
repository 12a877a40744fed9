"""Quadratic clients with known optima: f_i(w) = 1/2 (w - a_i)^T diag(A_i) (w - a_i).

Client i holds ``n_i`` identical samples ``[A_i, a_i]`` and trains full batch, so every local
step is an exact gradient step and every fixed point has a closed form (all maths is
elementwise because the Hessians are diagonal).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atoll.data import ClientData
from atoll.runtime.base import LocalWork

D = 3
A = torch.tensor([[0.5, 1.0, 2.0], [2.0, 0.5, 1.0], [1.0, 2.0, 0.5], [1.5, 1.5, 1.5]], dtype=torch.float64)
MINIMA = torch.tensor([[1.0, -2.0, 3.0], [-3.0, 1.0, 0.0], [2.0, 2.0, -1.0], [0.0, -1.0, 1.0]],
                      dtype=torch.float64)
SAMPLES = [1, 2, 3, 2]
STEPS = [1, 4, 12, 30]   # very different local step counts


def loss_fn(params, x, y, mask):
    a_diag, minimum = x[..., :D], x[..., D:]
    per = 0.5 * ((params["w"] - minimum) ** 2 * a_diag).sum(-1)
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp(min=1.0)


@dataclass(frozen=True)
class Data:
    clients: list


def data() -> Data:
    clients = []
    for a, m, n in zip(A, MINIMA, SAMPLES):
        x = torch.cat([a, m]).expand(n, 2 * D).clone()
        clients.append(ClientData(x, torch.zeros(n, dtype=torch.long), x[:0], torch.zeros(0, dtype=torch.long)))
    return Data(clients)


@dataclass(frozen=True)
class FixedSteps:
    steps: tuple

    def __call__(self, cid, round, seed, n):  # noqa: A002
        return self.steps[cid]


def work(steps=STEPS) -> LocalWork:
    return LocalWork(batch_size=max(SAMPLES), epochs=None, steps=1, schedule=FixedSteps(tuple(steps)))


def weights() -> torch.Tensor:
    p = torch.tensor(SAMPLES, dtype=torch.float64)
    return p / p.sum()


def optimum() -> torch.Tensor:
    """argmin sum_i p_i f_i."""
    p = weights()[:, None]
    return (p * A * MINIMA).sum(0) / (p * A).sum(0)


def fedavg_fixed_point(lr: float, steps=STEPS) -> torch.Tensor:
    """Where FedAvg stops: sum_i p_i (1 - (1 - lr A_i)^K_i) (a_i - w) = 0."""
    p, k = weights()[:, None], torch.tensor(steps, dtype=torch.float64)[:, None]
    g = p * (1 - (1 - lr * A) ** k)
    return (g * MINIMA).sum(0) / g.sum(0)


def fednova_fixed_point(lr: float, steps=STEPS) -> torch.Tensor:
    """Where FedNova (plain SGD) stops: the FedAvg condition with each delta divided by K_i."""
    p, k = weights()[:, None], torch.tensor(steps, dtype=torch.float64)[:, None]
    g = p * (1 - (1 - lr * A) ** k) / k
    return (g * MINIMA).sum(0) / g.sum(0)


def train(algorithm, rounds: int, runtime=None, steps=STEPS, init=None):
    """Full participation for ``rounds`` rounds; returns the final w."""
    from atoll.runtime.loop import LoopRuntime

    runtime = runtime or LoopRuntime()
    d = data()
    state = algorithm.init({"w": torch.zeros(D, dtype=torch.float64) if init is None else init})
    update = algorithm.client(loss_fn)
    cstates: dict = {}
    for _ in range(rounds):
        state, cstates, stats = runtime.run_round(algorithm, update, state, cstates,
                                                  list(range(len(d.clients))), d, work(steps), 0)
        assert stats.succeeded == len(d.clients), stats.failures
    return state, cstates
