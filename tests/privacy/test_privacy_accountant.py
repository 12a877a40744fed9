"""Accountant: published figures, agreement with dp-accounting, checkpoints, calibration, CLI."""
import argparse
import json
import math

import dp_accounting as dpa
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from atoll import privacy as P
from atoll.privacy import cli, events

ABADI = dict(q=0.01, sigma=4.0, steps=10_000, delta=1e-5)


def test_abadi_2016_moments_accountant_1_26():
    """Abadi et al. 2016, Sec. 5: q=0.01, sigma=4, T=10^4, delta=1e-5 gives epsilon ~ 1.26."""
    table = P.privacy_table(ABADI["q"], ABADI["sigma"], ABADI["steps"], ABADI["delta"])
    assert table["rdp_classic"] == pytest.approx(1.26, abs=0.02)
    assert table["pld"] < table["rdp"] < table["rdp_classic"]
    assert table["rdp"] == pytest.approx(1.035, abs=0.005)
    assert table["pld"] == pytest.approx(0.947, abs=0.005)


@pytest.mark.parametrize("sigma,epochs,published", [
    (1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20),  # tutorials/README.md table
    (1.1, 60, 3.0),  # the tutorial's default flags
])
def test_tf_privacy_mnist_tutorial_rows(sigma, epochs, published):
    """TF-Privacy MNIST DP-SGD tutorial: N=60000, batch 256, steps = epochs*N//batch,
    delta=1e-5, classical RDP conversion on its legacy orders."""
    steps = epochs * 60000 // 256
    eps = P.epsilon(256 / 60000, sigma, steps, 1e-5, kind="rdp_classic")
    assert eps == pytest.approx(published, abs=0.03)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_equals_dp_accounting(kind):
    event = dpa.PoissonSampledDpEvent(0.02, dpa.GaussianDpEvent(1.3))
    ours = P.Accountant(kind)
    ours.step(event, 500)
    ref = PLDAccountant() if kind == "pld" else RdpAccountant()
    ref.compose(event, 500)
    assert ours.epsilon(1e-6) == ref.get_epsilon(1e-6)
    assert ours.delta(2.0) == pytest.approx(ref.get_delta(2.0), rel=1e-12)


def test_state_is_json_and_resume_reproduces():
    acc = P.Accountant("pld")
    acc.step(P.poisson_gaussian(0.01, 1.1), 100)
    acc.step(P.gaussian(5.0))
    acc.step(P.laplace(3.0))
    back = P.Accountant.from_state(json.loads(json.dumps(acc.state())))
    assert back.events == acc.events
    assert back.epsilon(1e-5) == acc.epsilon(1e-5)
    for a in (acc, back):
        a.step(P.poisson_gaussian(0.01, 1.1), 50)
    assert back.epsilon(1e-5) == acc.epsilon(1e-5)


def test_repeated_steps_merge_into_one_ledger_entry():
    acc = P.Accountant("rdp")
    for _ in range(30):
        acc.step(P.poisson_gaussian(0.05, 1.0))
    assert acc.events == [(P.poisson_gaussian(0.05, 1.0), 30)]
    one = P.Accountant("rdp")
    one.step(P.repeated(P.poisson_gaussian(0.05, 1.0), 30))
    assert acc.epsilon(1e-5) == pytest.approx(one.epsilon(1e-5), rel=1e-12)


def test_would_exceed_checks_the_next_round_before_it_runs():
    ev = P.poisson_gaussian(0.01, 4.0)
    acc = P.Accountant("rdp")
    acc.step(ev, 9000)
    now, after = acc.epsilon(1e-5), P.epsilon(0.01, 4.0, 9500, 1e-5, "rdp")
    target = 0.5 * (now + after)
    assert acc.would_exceed(ev, target, 1e-5, count=500)
    assert not acc.would_exceed(ev, target, 1e-5, count=1)
    assert acc.epsilon(1e-5) == now  # nothing composed


def test_delta_and_epsilon_are_inverse():
    acc = P.Accountant("pld")
    acc.step(P.poisson_gaussian(0.01, 1.0), 1000)
    eps = acc.epsilon(1e-5)
    assert acc.delta(eps) == pytest.approx(1e-5, rel=1e-3)
    classic = P.Accountant("rdp_classic")
    classic.step(P.poisson_gaussian(0.01, 1.0), 1000)
    assert classic.delta(classic.epsilon(1e-5)) == pytest.approx(1e-5, rel=1e-6)


def test_laplace_is_pure_dp():
    acc = P.Accountant("pld")
    acc.step(P.laplace(2.0))
    assert acc.epsilon(1e-12) == pytest.approx(0.5, abs=2e-4)


def test_fixed_size_sampling_needs_rdp_and_replace_one():
    ev = P.fixed_size_gaussian(256, 60000, 1.1)
    for kind, rel in (("pld", "add_remove"), ("rdp", "add_remove"), ("pld", "replace_one")):
        with pytest.raises(ValueError, match="cannot account"):
            P.Accountant(kind, rel).step(ev)
    acc = P.Accountant("rdp", "replace_one")
    acc.step(ev, 100)
    ref = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    ref.compose(P.fixed_size_gaussian(256, 60000, 0.55), 100)  # replacing moves the sum by 2C
    assert acc.epsilon(1e-5) == ref.get_epsilon(1e-5)


def test_describe_and_bad_arguments():
    text = P.Accountant("rdp", "replace_one").describe()
    assert "replace one record" in text and "Prop. 12" in text
    assert "log(1/delta)" in P.Accountant("rdp_classic").describe()
    with pytest.raises(ValueError, match="privacy.accountant"):
        P.Accountant("moments")
    with pytest.raises(ValueError, match="probability"):
        P.poisson_gaussian(1.5, 1.0)


def test_event_dict_round_trip_rejects_foreign_modules():
    for ev in (P.repeated(P.poisson_gaussian(0.1, 2.0), 7), P.intrinsic_quantization(4, 0.5, 0.1, 100, 0.01),
               dpa.ComposedDpEvent([P.gaussian(1.0), P.laplace(2.0)])):
        assert events.from_dict(json.loads(json.dumps(events.to_dict(ev)))) == ev
    with pytest.raises(ValueError, match="not an event module"):
        events.from_dict({"module": "os", "class": "system"})


def test_noise_for_epsilon_meets_the_budget_tightly():
    sigma = P.noise_for_epsilon(1.0, 0.01, 10_000, 1e-5)
    assert P.epsilon(0.01, sigma, 10_000, 1e-5) <= 1.0
    assert P.epsilon(0.01, sigma - 0.003, 10_000, 1e-5) > 1.0
    assert sigma < P.noise_for_epsilon(1.0, 0.01, 10_000, 1e-5, kind="rdp")


def test_steps_for_budget_is_the_largest_within_budget():
    t = P.steps_for_budget(1.0, 0.01, 4.0, 1e-5)
    assert P.epsilon(0.01, 4.0, t, 1e-5) <= 1.0 < P.epsilon(0.01, 4.0, t + 1, 1e-5)
    assert P.steps_for_budget(0.01, 0.5, 0.5, 1e-5) == 0


def test_cli_prints_each_accountant(capsys):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["privacy", "epsilon", "--q", "0.01", "--noise", "4",
                              "--steps", "10000"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "1.2586" in out and "1.0355" in out and "0.9470" in out
    args = parser.parse_args(["privacy", "steps", "--batch", "600", "--records", "60000",
                              "--noise", "4", "--epsilon", "1", "--accountant", "rdp"])
    args.func(args)
    assert "9375" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--q"):
        cli.sampling_rate(parser.parse_args(["privacy", "noise", "--steps", "5", "--epsilon", "1"]))
    assert math.isclose(cli.sampling_rate(args), 0.01)
