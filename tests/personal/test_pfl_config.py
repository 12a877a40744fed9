"""pFedMe and Per-FedAvg from the TOML config: names and parameters round-trip, bad values are
refused naming the key, Per-FedAvg's personalized evaluation against the global model's."""
import pytest
import torch

from atoll import config
from atoll.config import ConfigError
from atoll.evaluate import FederatedEval
from atoll.runtime.loop import LoopRuntime
from atoll.simulation import simulate

from test_evaluation import SMALL


def test_config_round_trip_and_parameters_reach_the_recipe():
    text = SMALL + "[algorithm]\nname = \"pfedme\"\nlam = 5.0\ninner_steps = 3\ninner_lr = 0.1\nserver_lr = 2.0\n"
    cfg = config.load(text=text)
    again = config.load(text=config.dumps(cfg))
    assert again == cfg
    a = again.algorithm
    assert (a.name, a.lam, a.inner_steps, a.inner_lr, a.server_lr) == ("pfedme", 5.0, 3, 0.1, 2.0)
    cfg = config.load(text=SMALL, overrides=["algorithm.name=per_fedavg", "algorithm.variant=hf",
                                             "algorithm.inner_lr=0.03", "algorithm.delta=1e-4",
                                             "algorithm.adapt_steps=2"])
    assert config.load(text=config.dumps(cfg)) == cfg
    alg, *_ = config.build(cfg)
    assert alg.name == "per_fedavg" and alg.adapt is not None
    # the parameters reach the recipe: adapt_steps = 2 steps of size inner_lr = 0.03
    w, x = {"w": torch.tensor([1.0], dtype=torch.float64)}, torch.zeros(1, 1, dtype=torch.float64)
    square = lambda p, x, y, mask: 0.5 * (p["w"] ** 2).sum()  # noqa: E731
    assert float(alg.adapt(square, w, x, torch.zeros(1, dtype=torch.long))["w"]) == pytest.approx(0.97 ** 2)


@pytest.mark.parametrize("overrides,key", [
    (["algorithm.name=pfedme", "algorithm.lam=0"], "algorithm.lam"),
    (["algorithm.name=pfedme", "algorithm.inner_lr=0.5"], "algorithm.inner_lr"),  # 0.5 * 15 >= 2
    (["algorithm.name=pfedme", "algorithm.lam=30"], "client.lr"),                 # 0.1 * 30 >= 2
    (["algorithm.name=pfedme", "algorithm.inner_steps=0"], "algorithm.inner_steps"),
    (["algorithm.name=per_fedavg", "algorithm.variant=\"so\""], "algorithm.variant"),
    (["algorithm.name=per_fedavg", "algorithm.delta=0"], "algorithm.delta"),
    (["algorithm.name=per_fedavg", "algorithm.adapt_steps=-1"], "algorithm.adapt_steps"),
    (["algorithm.name=per_fedavg", "algorithm.inner_step=2"], "algorithm.inner_steps"),  # did you mean
    (["algorithm.name=pfedm"], "algorithm.name"),
])
def test_bad_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.build(config.load(text=SMALL, overrides=overrides))


def _run(*more):
    cfg = config.load(text=SMALL, overrides=["algorithm.name=per_fedavg", "eval.new_clients=0", *more])
    alg, model, data, plan = config.build(cfg)
    return model, data, simulate(alg, model, data, plan, runtime=LoopRuntime(), plots=False)


def test_per_fedavg_with_no_adapt_step_evaluates_the_global_model():
    """adapt_steps = 0: each client's model is the global one (FederatedEval's numbers); one
    step of size inner_lr changes them (same seed, same run: test_evaluation)."""
    model, data, res = _run("algorithm.adapt_steps=0")
    summary, _ = FederatedEval(data.clients)(model, res.state.params)
    assert res.final["pers_acc_mean"] == pytest.approx(summary["fed_acc_mean"], rel=1e-9)
    *_, one = _run("algorithm.adapt_steps=1", "algorithm.inner_lr=0.5")
    assert one.final["pers_acc_mean"] != pytest.approx(res.final["pers_acc_mean"], abs=1e-3)
