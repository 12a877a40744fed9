"""Privacy under the asynchronous scheduler: every release is accounted (the client that took part
most often sets epsilon), the budget stops dispatching, and dp_fedavg is refused with the reason.
Before, an ``[async]`` + ``[privacy]`` run printed no epsilon and ignored its budget."""
import pytest

from atoll import config
from atoll import privacy as P
from atoll.runtime.loop import LoopRuntime
from atoll.simulation import simulate

from tests.hetero.test_async import BASE, DEVICES

ASYNC = ["async.mode=fedbuff", "async.concurrency=4", "async.buffer=2"]
DP_SGD = ["privacy.mode=dp_sgd", "privacy.sample_rate=0.2", "privacy.noise_multiplier=1.5",
          "client.steps=2"]


def run(over, rounds=6):
    text = BASE.replace("epochs = 1\n", "").replace("rounds = 4", f"rounds = {rounds}")
    alg, model, fed, plan = config.build(config.load(text=text, overrides=list(over)))
    return simulate(alg, model, fed, plan, runtime=LoopRuntime(), plots=False)


def _epsilon(participations: int) -> float:
    acc = P.Accountant("pld")
    acc.step(P.poisson_gaussian(0.2, 1.5), 2 * participations)
    return acc.epsilon(1e-5)


@pytest.mark.parametrize("extra", [[], DEVICES], ids=["zero-delay", "devices"])
def test_every_line_has_the_epsilon_of_the_most_frequent_participant(extra):
    res = run(ASYNC + DP_SGD + extra)
    assert len(res.metrics) == 6
    prev = 0
    for line in res.metrics:
        n = line["participations_max"]
        assert n >= prev and line["epsilon"] == pytest.approx(_epsilon(n), rel=1e-12)
        prev = n
    info = res.final["privacy"]
    assert info["epsilon"] == res.metrics[-1]["epsilon"] and info["stopped"] is None
    # 4 in flight from the start and 2 more per server step: at least one client twice by now
    assert res.metrics[-1]["participations_max"] >= 2


def test_the_budget_stops_dispatching_and_the_run_ends_cleanly():
    budget = (_epsilon(2) + _epsilon(3)) / 2  # room for two participations per client, not three
    res = run(ASYNC + DP_SGD + [f"privacy.target_epsilon={budget}"], rounds=50)
    info = res.final["privacy"]
    assert info["stopped"] and "participation of a client 3" in info["stopped"]
    assert len(res.metrics) < 50
    assert all(m["epsilon"] <= budget for m in res.metrics)
    assert res.metrics[-1]["participations_max"] == 2


def test_local_mode_is_accounted_per_participation():
    res = run(ASYNC + ["privacy.mode=local", "privacy.noise_multiplier=4.0"])
    n = res.metrics[-1]["participations_max"]
    acc = P.Accountant("pld")
    acc.step(P.gaussian(4.0), n)
    assert res.metrics[-1]["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12)


def test_dp_fedavg_is_refused_asynchronously_with_the_reason():
    with pytest.raises(config.ConfigError, match="not Poisson samples"):
        config.build(config.load(text=BASE, overrides=ASYNC + [
            "privacy.mode=dp_fedavg", "sampling.method=poisson", "sampling.rate=0.5",
            "privacy.noise_multiplier=1.0"]))
