"""Accuracy checks on real data. The quickstart one is fast enough for the default suite."""
import pytest

from atoll import config
from atoll.simulation import simulate


def _final(path, overrides=()):
    alg, model, data, plan = config.build(config.load(path, list(overrides)))
    return simulate(alg, model, data, plan, plots=False)


def test_quickstart_fedavg_digits_iid_reaches_95_percent():
    res = _final("examples/quickstart/digits.toml")
    assert res.final["test_acc"] >= 0.95
    assert res.final["fed_acc_min"] >= 0.85


@pytest.mark.slow
def test_fedprox_keeps_straggler_work_and_beats_fedavg_dropping_it():
    path = "examples/fedprox/synthetic_stragglers.toml"
    avg = _final(path, ["rounds=40", "algorithm.name=fedavg", "client.drop_stragglers=true"])
    prox = _final(path, ["rounds=40", "algorithm.name=fedprox", "client.drop_stragglers=false"])
    assert prox.final["test_acc"] > avg.final["test_acc"] + 0.02
    assert prox.metrics[-1]["global_train_loss"] < avg.metrics[-1]["global_train_loss"]
