"""Distributed DP under the secure sum (Skellam): the bit budget, the noise each client adds,
exactness of the unmasked noisy sum, the accounting, and the refusals."""
import logging
import math

import numpy as np
import pytest
import torch

from atoll import config
from atoll.privacy import events as ev
from atoll.privacy.accountant import Accountant
from atoll.secure import secagg
from atoll.secure.distributed import TAILS, plan
from atoll.secure.stage import SecureSum
from atoll.simulation import simulate

from tests.secure.test_stage import BASE

DIST = ["secure.method=secagg+", "secure.neighbours=4", "privacy.mode=distributed",
        "privacy.accountant=rdp", "privacy.clip=0.5", "rounds=3"]


def test_the_scale_is_the_largest_whose_sum_fits_the_bits():
    p = plan(clip=0.5, z=1.0, d=650, clients=8, n_max=10, bits=20)
    assert p.bound < 2 ** 19
    bigger = plan(clip=0.5 * 1.01, z=1.0, d=650, clients=8, n_max=10, bits=20)  # same bits, 1% more range
    assert bigger.scale < p.scale
    assert p.bound == pytest.approx(10 * (0.5 * p.scale + 1) + TAILS * math.sqrt(2 * p.mu))
    assert 2 * p.mu == pytest.approx((1.0 * p.delta2) ** 2)  # the Gaussian's variance at z = 1
    with pytest.raises(ValueError, match="raise secure.bits"):
        plan(clip=0.5, z=1.0, d=650, clients=8, n_max=10, bits=8)


def test_each_client_rounds_without_bias_and_adds_its_share_of_the_noise():
    p = plan(clip=1.0, z=2.0, d=4, clients=5, n_max=5, bits=16)
    x = np.array([0.3, -0.2, 0.1, 0.05])  # norm < clip: not clipped
    draws = np.stack([p.encode(x, np.random.default_rng(k)) for k in range(20000)]).astype(np.float64)
    assert np.allclose(draws.mean(0), x * p.scale, atol=4 * math.sqrt(2 * p.mu_client / 20000))
    assert draws.var(0) == pytest.approx(np.full(4, 2 * p.mu_client), rel=0.05)  # Skellam(mu/k)
    big = p.encode(np.array([30.0, 40.0, 0.0, 0.0]), np.random.default_rng(0)).astype(np.float64)
    assert np.linalg.norm(big) < p.scale * 1.0 + 12 * math.sqrt(2 * p.mu_client * 4)  # clipped to 1


def test_the_unmasked_noisy_sum_is_the_plain_integer_sum_bit_for_bit():
    d, n = 30, 6
    sec = SecureSum(clip=1.0, max_weight=1.0, input_bits=16, neighbours=4,
                    noise=plan(0.5, 1.0, d, n, n, 16 + 3))
    g = torch.Generator().manual_seed(0)
    like = {"w": torch.zeros(d, dtype=torch.float64)}
    inputs = {c: sec.encode({"w": 0.2 * torch.randn(d, generator=g, dtype=torch.float64)}, 1.0, c)
              for c in range(n)}
    mean, stats = sec.aggregate(inputs, 1, like)
    plain = np.sum(np.stack(list(inputs.values())), axis=0)
    assert torch.equal(mean["w"], torch.from_numpy(plain / (sec.noise.scale * n)))
    assert stats["secure_survivors"] == n


def test_too_few_survivors_or_a_wrapped_sum_fails_the_round():
    p = plan(0.5, 1.0, 10, clients=5, n_max=6, bits=16)
    with pytest.raises(ValueError, match="fewer than the 5"):
        p.decode(np.zeros(10, dtype=np.int64), survivors=4)  # less noise than promised
    with pytest.raises(ValueError, match="beyond the ring's bound"):
        p.decode(np.full(10, int(p.bound) + 1, dtype=np.int64), survivors=5)
    sec = SecureSum(clip=1.0, max_weight=1.0, input_bits=12, noise=p)
    like = {"w": torch.zeros(10, dtype=torch.float64)}
    inputs = {c: sec.encode({"w": torch.zeros(10, dtype=torch.float64)}, 1.0, c) for c in range(4)}
    with pytest.raises(secagg.SecAggError, match="fewer than the 5"):
        sec.aggregate(inputs, 1, like)


def test_the_skellam_event_is_a_little_above_the_gaussian_and_falls_with_more_noise():
    eps = {}
    for z in (1.0, 2.0):
        p = plan(0.5, z, 650, 8, 8, 19)
        acc = Accountant("rdp")
        acc.step(ev.zcdp(*p.zcdp()), 10)
        gauss = Accountant("rdp")
        gauss.step(ev.gaussian(z), 10)
        eps[z] = acc.epsilon(1e-5)
        assert gauss.epsilon(1e-5) <= eps[z] <= 1.02 * gauss.epsilon(1e-5)
    assert eps[2.0] < eps[1.0]


def test_a_distributed_run_is_accounted_and_calibrated():
    logging.getLogger("atoll").setLevel(logging.ERROR)
    alg, model, fed, plan_ = config.build(config.load(text=BASE, overrides=DIST + ["privacy.target_epsilon=5"]))
    res = simulate(alg, model, fed, plan_, plots=False)
    assert res.state.round == 3
    assert 0.97 * 5 <= res.metrics[-1]["epsilon"] <= 5
    acc = Accountant("rdp")
    acc.step(ev.zcdp(*alg.secure.noise.zcdp()), 3)
    assert res.metrics[-1]["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)
    assert res.metrics[-1]["secure_survivors"] == 8


@pytest.mark.parametrize("over, message", [
    (["privacy.mode=distributed", "privacy.accountant=rdp", "privacy.noise_multiplier=1"], "needs \\[secure\\]"),
    (DIST[:3] + ["privacy.noise_multiplier=1"], "privacy.accountant = \"rdp\""),
    (DIST[:2] + ["privacy.mode=dp_fedavg", "privacy.noise_multiplier=1", "sampling.method=poisson",
                 "sampling.rate=0.5"], "use privacy.mode = \"distributed\""),
    (DIST + ["privacy.noise_multiplier=1", "privacy.sample_rate=0.1"], "does not apply"),
])
def test_misuse_is_refused_with_the_reason(over, message):
    with pytest.raises(config.ConfigError, match=message):
        config.build(config.load(text=BASE, overrides=over))


def test_a_deployed_client_draws_its_noise_from_its_own_secret():
    from atoll.deploy.client import private_noise

    alg = config.build(config.load(text=BASE, overrides=DIST + ["privacy.noise_multiplier=1"]))[0]
    assert private_noise(alg)
    plain = config.build(config.load(text=BASE, overrides=DIST[:2]))[0]
    assert not private_noise(plain)


def test_replace_one_doubles_the_sensitivity():
    over = DIST + ["privacy.noise_multiplier=2", "privacy.neighboring=replace_one"]
    alg, _, _, plan_ = config.build(config.load(text=BASE, overrides=over))
    rho, xi = alg.secure.noise.zcdp(2.0)
    assert plan_.privacy.events[0][0] == ev.zcdp(rho, xi)
    assert plan_.privacy.details["sensitivity_l2"] == 2 * alg.secure.noise.delta2
