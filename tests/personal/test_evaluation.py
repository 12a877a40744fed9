"""Personalized evaluation in a run: each client's own model, new clients that never train,
the config names, and reproducibility (loop and vectorised runtimes)."""
import pytest
import torch

from atoll import config, personalization
from atoll.client import model_loss
from atoll.config import ConfigError
from atoll.evaluate import FederatedEval
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

SMALL = """
rounds = 4
dtype = "float64"
[data]
name = "wine"
num_clients = 8
partition = "shards"
shards_per_client = 1
client_test_fraction = 0.4
[model]
name = "mlp"
hidden = [8]
[client]
lr = 0.1
batch_size = 8
[sampling]
clients_per_round = 3
[eval]
personal = true
new_clients = 2
finetune = 1
"""


def run(name, runtime=None, *more):
    cfg = config.load(text=SMALL, overrides=[f"algorithm.name={name}", *more])
    alg, model, data, plan = config.build(cfg)
    return alg, model, data, simulate(alg, model, data, plan, runtime=runtime or LoopRuntime(), plots=False)


def test_fedavg_personal_accuracy_is_the_global_models_on_the_training_clients():
    """No personalization hook: each client's own model is the global one, so the summary equals
    FederatedEval's on the training clients (a separate, batched reference)."""
    _, model, data, res = run("fedavg", None, "eval.new_clients=0")
    summary, _ = FederatedEval(data.clients)(model, res.state.params)
    assert res.final["pers_acc_mean"] == pytest.approx(summary["fed_acc_mean"], rel=1e-6)
    assert res.final["pers_acc_p10"] == pytest.approx(summary["fed_acc_p10"], rel=1e-6)
    assert "new_acc_mean" not in res.final


@pytest.mark.parametrize("name", ["ditto", "fedper", "fedrep", "pfedme", "per_fedavg"])
def test_new_clients_never_train_and_metrics_are_reproducible(name):
    alg, model, data, a = run(name)
    *_, b = run(name)
    *_, c = run(name, VmapRuntime())
    assert [m for m in a.metrics] == [m for m in b.metrics]  # same seed, same lines
    for k in ("pers_acc_mean", "pers_acc_p10", "new_acc_mean", "new_acc_p10"):
        assert 0.0 <= a.final[k] <= 1.0
        assert a.final[k] == pytest.approx(c.final[k], abs=1e-9)  # vmap's ClientStore, loop's dict
    assert all(k in a.metrics[-1] for k in ("pers_acc_mean", "new_acc_mean"))


def test_held_out_clients_are_never_sampled():
    cfg = config.load(text=SMALL, overrides=["algorithm.name=ditto", "rounds=6", "sampling.clients_per_round=6"])
    alg, model, data, plan = config.build(cfg)
    rt = LoopRuntime()
    seen = []
    orig = rt.run_round

    def spy(algorithm, update, state, cstates, cohort, *rest):
        seen.extend(cohort)
        return orig(algorithm, update, state, cstates, cohort, *rest)

    rt.run_round = spy
    simulate(alg, model, data, plan, runtime=rt, plots=False)
    assert set(seen) == set(range(6))  # clients 6 and 7 are the new ones


def test_own_model_is_the_clients_personal_one():
    """Ditto: v_i once the client has trained, the global model before; FedPer: its head on the
    global body. Evaluated on a client whose own model is right and the global one wrong."""
    alg, model, data, res = run("ditto")
    params = res.state.params
    fresh = alg.new_client_state(params)
    assert all(torch.equal(v, params[k]) for k, v in personalization.own_model(alg, params, fresh).items())
    trained = personalization.states_of({0: {**fresh, "personal": {k: v + 1 for k, v in params.items()},
                                             "seen": torch.ones(())}}, [0, 1])
    assert list(trained) == [0]
    own = personalization.own_model(alg, params, trained[0])
    assert all(torch.equal(v, params[k] + 1) for k, v in own.items())


def test_fine_tuning_moves_a_new_clients_model():
    alg, model, data, res = run("fedavg", None, "eval.new_clients=0")
    update = alg.client(model_loss(model))
    _, _, _, plan = config.build(config.load(text=SMALL))
    zero = personalization.fine_tuned(alg, update, res.state, data.clients[7], 7, 0, plan.work, 0)
    one = personalization.fine_tuned(alg, update, res.state, data.clients[7], 7, 1, plan.work, 0)
    assert all(torch.equal(zero[k], res.state.params[k]) for k in zero)
    assert max(float((one[k] - zero[k]).abs().max()) for k in one) > 1e-4


def test_bad_new_clients_is_refused_naming_the_field():
    cfg = config.load(text=SMALL, overrides=["eval.new_clients=8"])
    with pytest.raises(ConfigError, match="eval.new_clients"):
        config.build(cfg)


def test_personal_evaluation_with_async_is_refused():
    cfg = config.load(text=SMALL, overrides=["eval.new_clients=0", "async.mode=fedbuff"])
    with pytest.raises(ConfigError, match="synchronous"):
        config.build(cfg)
