"""Simulation speed: training samples per second for LoopRuntime, VmapRuntime (and RayRuntime
when installed) against plain centralized PyTorch training of the same model, same batch size.

    .venv/bin/python bench/simulation_speed.py [A B C memory startup]

A: 2NN (784-200-200-10) on 60,000 synthetic samples, 100 IID clients, 10 per round.
B: the same with 1,000 clients, 100 per round.
C: digits over 1,000 clients (1-2 samples each), 100 per round.
All: 1 local epoch, batch 10, SGD. Samples/s = training samples of all clients of a round per
wall second, median over the measured rounds (after one warm-up round).
"""
import statistics
import sys
import time

import torch

from atoll import algorithms, data, models, transforms
from atoll.client import model_loss, params_of
from atoll.runtime.base import LocalWork
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.sampling import sample

FLOP_PER_SAMPLE = 6 * (784 * 200 + 200 * 200 + 200 * 10)  # forward + backward of the 2NN
CEILING = 100_000  # samples/s: ~130 GFLOP/s on both cores over ~1.2 MFLOP per sample


def synthetic_2nn(n=60_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + 2.0 * torch.randn(n, 784, generator=g)
    return data.Dataset("synthetic-2nn", x, y, 10)


def workload(name):
    if name in ("A", "B"):
        clients, per_round = (100, 10) if name == "A" else (1000, 100)
        fed = data.build(synthetic_2nn(), num_clients=clients, partition="iid", test_fraction=0.01,
                         client_test_fraction=0.0, seed=0)
        model = models.build("mlp", 784, 10, hidden=[200, 200])
    else:
        clients, per_round = 1000, 100
        fed = data.build(data.load("digits"), num_clients=clients, partition="iid",
                         test_fraction=0.01, client_test_fraction=0.0, seed=0)
        model = models.build("mlp", 64, 10, hidden=[200, 200])
    return fed, model, per_round


def runtime_speed(runtime, fed, model, per_round, rounds, threads):
    torch.set_num_threads(threads)
    alg = algorithms.fedavg(transforms.sgd(0.05))
    update = alg.client(model_loss(model))
    state, cstates, work = alg.init(params_of(model)), {}, LocalWork(batch_size=10, epochs=1)
    rates = []
    for r in range(rounds + 1):
        cohort = sample(len(fed.clients), r + 1, 0, count=per_round)
        t0 = time.perf_counter()
        state, cstates, stats = runtime.run_round(alg, update, state, cstates, cohort, fed, work, 0)
        if r > 0:  # round 0 warms up
            rates.append(stats.samples / (time.perf_counter() - t0))
    return statistics.median(rates)


def centralized_speed(fed, model, threads, max_steps=3000):
    torch.set_num_threads(threads)
    x = torch.cat([c.x for c in fed.clients])
    y = torch.cat([c.y for c in fed.clients])
    m = type(model)(*[]) if False else model
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    lossf = torch.nn.CrossEntropyLoss()
    perm = torch.randperm(x.shape[0])
    steps = min(max_steps, x.shape[0] // 10)
    for warm in (True, False):
        t0 = time.perf_counter()
        for s in range(50 if warm else steps):
            idx = perm[s * 10:(s + 1) * 10]
            opt.zero_grad()
            lossf(m(x[idx]), y[idx]).backward()
            opt.step()
    return steps * 10 / (time.perf_counter() - t0)


def speed_table(names):
    print(f"{'workload':8s} {'central 1t':>11s} {'central 2t':>11s} {'loop':>9s} {'vmap':>9s} "
          f"{'vmap/central':>13s} {'vmap/loop':>10s} {'of ceiling':>11s}")
    for name in names:
        fed, model, per_round = workload(name)
        c1 = centralized_speed(fed, models.build("mlp", fed.n_features, 10, hidden=[200, 200]), 1)
        c2 = centralized_speed(fed, models.build("mlp", fed.n_features, 10, hidden=[200, 200]), 2)
        central = max(c1, c2)
        loop = runtime_speed(LoopRuntime(), fed, model, per_round, 3, threads=1)
        vm = runtime_speed(VmapRuntime(threads=2), fed, model, per_round, 5, threads=2)
        ceil = f"{vm / CEILING:.0%}" if name in "AB" else "—"
        print(f"{name:8s} {c1:11,.0f} {c2:11,.0f} {loop:9,.0f} {vm:9,.0f} {vm / central:13.2f} "
              f"{vm / loop:10.1f} {ceil:>11s}", flush=True)


if __name__ == "__main__":
    todo = sys.argv[1:] or ["A", "B", "C"]
    speed_table([n for n in todo if n in "ABC"])
