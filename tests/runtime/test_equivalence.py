"""Fast runtimes against the reference LoopRuntime, in float64 with fixed keys."""
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
num_clients = 6
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
clients_per_round = 5
"""

CASES = {
    "fedavg": [],
    "fedprox": ["algorithm.name=fedprox", "algorithm.mu=0.3"],
    "fedadam": ["algorithm.name=fedadam", "algorithm.server_lr=0.05", "client.momentum=0.9"],
    "drop": ["client.drop_stragglers=true"],
}


def _run(runtime, overrides):
    alg, model, data, plan = config.build(config.load(text=BASE, overrides=overrides))
    assert len({c.n for c in data.clients}) > 2  # unequal client sizes
    return simulate(alg, model, data, plan, runtime=runtime, plots=False)


def _assert_same(a, b, tol=1e-9):
    for k in a.state.params:
        torch.testing.assert_close(a.state.params[k], b.state.params[k], rtol=0, atol=tol)
    assert len(a.metrics) == len(b.metrics)
    for ma, mb in zip(a.metrics, b.metrics):
        assert ma.keys() == mb.keys()
        for key in ma:
            if isinstance(ma[key], float):
                assert ma[key] == pytest.approx(mb[key], abs=tol), key
            else:
                assert ma[key] == mb[key], key


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("case", list(CASES))
def test_vmap_equals_loop(case, fused):
    loop = _run(LoopRuntime(), CASES[case])
    assert any(m.get("stragglers_dropped") for m in loop.metrics) or case != "drop"
    _assert_same(loop, _run(VmapRuntime(fused=fused), CASES[case]))


@pytest.mark.parametrize("over", [["model.name=logreg", "model.hidden=[]"],  # fused
                                  ["data.name=digits", "model.name=cnn", "data.num_clients=8",
                                   "client.epochs=1", "client.batch_size=16", "model.hidden=[]"]],  # generic vmap
                         ids=["logreg", "cnn"])
def test_other_models(over):
    _assert_same(_run(LoopRuntime(), over), _run(VmapRuntime(), over))


def test_fused_tanh_stack_matches_local_training():
    from atoll.client import local_training, model_loss, params_of
    from atoll.runtime import fused
    from atoll.transforms import adam
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    params = params_of(model)
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 6, 3))
    mask = torch.rand(4, 6, 3) > 0.2
    step_mask = torch.rand(4, 6) > 0.3
    batches = {"x": x, "y": y, "mask": mask}
    delta, metrics = fused.local_training(fused.layers_of(model), adam(0.01), params, batches, step_mask)
    ref = local_training(model_loss(model), adam(0.01))
    for c in range(4):
        one = ref(params, {}, {"params": params}, {k: v[c] for k, v in batches.items()}, step_mask[c], 0)
        for k in params:
            torch.testing.assert_close(delta[k][c], one.delta[k], rtol=0, atol=1e-12)
        assert float(metrics["loss"][c]) == pytest.approx(float(one.metrics["loss"]), abs=1e-12)


def test_chunking_by_memory_budget_gives_same_result():
    loop = _run(LoopRuntime(), [])
    _assert_same(loop, _run(VmapRuntime(memory_budget_mb=0.01), []))  # one client per chunk


def test_unequal_step_counts_in_one_chunk():
    # stragglers=0.5 and quantity skew: the padded chunk mixes very different step counts
    res = _run(VmapRuntime(), [])
    assert all(m["clients_succeeded"] == 5 for m in res.metrics)
