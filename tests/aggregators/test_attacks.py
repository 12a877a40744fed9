"""The simulated attacks: each against a hand computation, and against the mean and a robust rule."""
import math

import numpy as np
import pytest
import torch

from atoll import attacks, config
from atoll.attacks import Adversary
from atoll.runtime.base import AllClientsFailed
from atoll.runtime.loop import LoopRuntime
from atoll.simulation import simulate


def rows(n=8, d=5, seed=0):
    return torch.tensor(np.random.default_rng(seed).normal(size=(n, d)))


def attack(name, x, bad, **kw):
    adv = Adversary(name, frozenset(bad), **kw)
    out = adv({"w": x.clone()}, list(range(len(x))), round=1, key=123)["w"]
    honest = [i for i in range(len(x)) if i not in bad]
    np.testing.assert_array_equal(out[honest].numpy(), x[honest].numpy())  # honest rows untouched
    return out[sorted(bad)], x[honest]


def test_update_attacks_equal_their_definitions():
    x = rows()
    out, h = attack("sign_flip", x, {1, 4})
    assert torch.equal(out, -x[[1, 4]])
    out, h = attack("scaled", x, {2}, scale=5.0)
    assert torch.equal(out, 5.0 * x[[2]])
    out, h = attack("ipm", x, {0, 3}, eps=0.5)
    torch.testing.assert_close(out, (-0.5 * h.mean(0)).expand(2, -1))
    out, h = attack("alie", x, {0, 3})
    n, f = 8, 2
    s = math.floor(n / 2 + 1) - f
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((n - s) / n)))
    torch.testing.assert_close(out, (h.mean(0) - z * h.std(0, unbiased=False)).expand(2, -1))
    out, _ = attack("gaussian", x, {5}, sigma=3.0)
    again, _ = attack("gaussian", x, {5}, sigma=3.0)
    assert torch.equal(out, again) and 1.0 < float(out.std()) < 9.0  # seeded draws at that scale


@pytest.mark.parametrize("kind", ["min_max", "min_sum"])
def test_min_max_and_min_sum_sit_on_the_edge_of_the_honest_spread(kind):
    x = rows(n=9, d=6, seed=2)
    out, h = attack(kind, x, {0, 1})
    m = out[0]
    d = torch.cdist(h, h)
    if kind == "min_max":
        used, bound = (h - m).norm(dim=1).max(), d.max()
    else:
        used, bound = (h - m).norm(dim=1).square().sum(), d.square().sum(1).max()
    assert used <= bound * (1 + 1e-9) and used >= bound * (1 - 1e-3)  # as far as allowed, no further
    assert float((m - h.mean(0)).norm()) > 0


def test_attack_waits_for_its_start_round():
    x = rows()
    adv = Adversary("sign_flip", frozenset({0}), start_round=3)
    assert torch.equal(adv({"w": x}, list(range(8)), round=2, key=0)["w"], x)
    assert torch.equal(adv({"w": x}, list(range(8)), round=3, key=0)["w"][0], -x[0])


BASE = """
rounds = 10
seed = 3
[data]
name = "digits"
num_clients = 10
[client]
lr = 0.1
batch_size = 16
[eval]
federated = false
"""


def run(extra, tmp_path):
    alg, model, fed, plan = config.build(config.load(text=BASE + extra))
    return simulate(alg, model, fed, plan, runtime=LoopRuntime(), run_dir=tmp_path).final["test_acc"]


def test_a_scaled_attacker_ruins_the_mean_and_not_the_median(tmp_path):
    attack_ = "[attack]\nname = 'scaled'\nscale = -100.0\ncount = 2\n"
    clean = run("", tmp_path / "clean")
    try:
        broken = run(attack_, tmp_path / "mean")
    except AllClientsFailed:  # the model went to NaN: every later update is rejected
        broken = 0.0
    robust = run(attack_ + "[aggregator]\nname = 'median'\n", tmp_path / "median")
    assert clean > 0.85 and broken < 0.5 and robust > clean - 0.06, (clean, broken, robust)


def test_data_attacks_poison_only_the_attackers():
    fed = config.build_data(config.load(text=BASE))
    adv = Adversary("label_flip", frozenset({1}))
    out = attacks.poison(fed, adv, fed.n_classes)
    assert torch.equal(out.clients[1].y, fed.n_classes - 1 - fed.clients[1].y)
    assert torch.equal(out.clients[0].y, fed.clients[0].y) and out.clients[0].x is fed.clients[0].x
    bd = attacks.poison(fed, Adversary("backdoor", frozenset({2})), fed.n_classes, target=7, fraction=0.5)
    k = max(1, int(0.5 * fed.clients[2].n))
    assert (bd.clients[2].y[:k] == 7).all() and torch.equal(bd.clients[2].y[k:], fed.clients[2].y[k:])


def test_attack_config_is_checked_and_refused_in_deployment(tmp_path):
    with pytest.raises(config.ConfigError, match=r"attackers \[12\]"):
        config.build(config.load(text=BASE + "[attack]\nname='ipm'\nclients=[12]\n"))
    with pytest.raises(config.ConfigError, match="attack.target = 11"):
        config.build(config.load(text=BASE + "[attack]\nname='backdoor'\ncount=1\ntarget=11\n"))
    from atoll.deploy.server import Server
    with pytest.raises(config.ConfigError, match="simulation only"):
        Server(config.load(text=BASE + "[attack]\nname='ipm'\ncount=1\n"), run_dir=tmp_path, insecure=True)
