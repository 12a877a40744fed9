"""VmapRuntime against the reference LoopRuntime: float64, fixed keys, tolerance 1e-9.

Unequal client sizes (quantity skew), unequal step counts (half the clients straggle), several
chunks, both engines (fused MLP/SGD and generic vmap), FedAvg, FedProx and FedAdam.
"""
import pytest
import torch

from atoll import config
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

BASE = """
rounds = 3
dtype = "float64"
[data]
name = "wine"
num_clients = 8
partition = "quantity"
sigma = 1.0
[model]
name = "mlp"
hidden = [8]
[client]
lr = 0.05
batch_size = 4
epochs = 2
stragglers = 0.5
[sampling]
clients_per_round = 6
"""
ALGORITHMS = {
    "fedavg": [],
    "fedprox": ["algorithm.name=fedprox", "algorithm.mu=0.3"],
    "fedadam": ["algorithm.name=fedadam", "algorithm.server_lr=0.05"],
}
TOL = 1e-9


def build(overrides=()):
    return config.build(config.load(text=BASE, overrides=list(overrides)))


def run(runtime, overrides=(), data=None):
    alg, model, fed, plan = build(overrides)
    return simulate(alg, model, data or fed, plan, runtime=runtime, plots=False)


def assert_same(a, b, tol=TOL):
    for k in a.state.params:
        torch.testing.assert_close(a.state.params[k], b.state.params[k], rtol=0, atol=tol)
    assert len(a.metrics) == len(b.metrics)
    for ma, mb in zip(a.metrics, b.metrics):
        assert ma.keys() == mb.keys()
        for key, va in ma.items():
            if isinstance(va, float):
                assert va == pytest.approx(mb[key], abs=tol), key
            else:
                assert va == mb[key], key  # counts, bytes, failure reasons: exactly equal


@pytest.fixture(scope="module")
def loop_runs():
    return {name: run(LoopRuntime(), over) for name, over in ALGORITHMS.items()}


def test_workload_is_heterogeneous():
    _, _, fed, _ = build()
    assert len({c.n for c in fed.clients}) >= 4  # unequal client sizes


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_vmap_equals_loop(loop_runs, name, fused):
    runtime = VmapRuntime(fused=fused, chunk_clients=4)  # 6 clients per round: two chunks
    assert_same(loop_runs[name], run(runtime, ALGORITHMS[name]))
    assert runtime._engine[1].name == ("fused-mlp" if fused else "vmap")


@pytest.mark.parametrize("budget", [1, 40_000, 2**30], ids=["one-per-chunk", "few", "one-chunk"])
def test_chunking_by_memory_budget_gives_same_result(loop_runs, budget):
    runtime = VmapRuntime(memory_budget_bytes=budget)
    assert_same(loop_runs["fedprox"], run(runtime, ALGORITHMS["fedprox"]))


def test_dropped_stragglers_same_as_loop():
    over = ["client.drop_stragglers=true"]
    loop = run(LoopRuntime(), over)
    assert sum(m.get("stragglers_dropped", 0) for m in loop.metrics) > 0
    assert_same(loop, run(VmapRuntime(), over))


@pytest.mark.parametrize("over", [["client.momentum=0.9"], ["model.name=logreg", "model.hidden=[]"],
                                  ["client.optimizer=adam", "client.lr=0.01"]],
                         ids=["momentum-generic", "logreg-fused", "adam-generic"])
def test_other_parts(over):
    runtime = VmapRuntime()
    assert_same(run(LoopRuntime(), over), run(runtime, over))


def test_failing_clients_dropped_with_loop_reasons():
    from dataclasses import replace

    _, _, fed, _ = build()
    clients = list(fed.clients)
    clients[1] = replace(clients[1], x=clients[1].x * float("nan"))      # non-finite update
    clients[3] = replace(clients[3], y=torch.full_like(clients[3].y, 99))  # loss raises
    bad = replace(fed, clients=clients)
    loop = run(LoopRuntime(), data=bad)
    reasons = [f for m in loop.metrics for f in m.get("failures", [])]
    assert {c for c, _ in reasons} == {1, 3}
    for fused in (True, False):
        assert_same(loop, run(VmapRuntime(fused=fused), data=bad))
