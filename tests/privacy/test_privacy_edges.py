"""Accounting at its edges (issue 17, items 2-4): infinite epsilon of the intrinsic mechanism,
the replace-one sensitivity convention (RDP >= PLD for every event and relation), calibration
that meets tiny targets and uses the run's relation, and the ``atoll privacy`` command."""
import math
import re

import pytest

from atoll import config
from atoll import privacy as P
from atoll.cli import main
from atoll.privacy import calibrate
from atoll.privacy import events as ev
from atoll.privacy.accountant import Accountant
from atoll.privacy.irwin_hall import delta_floor
from atoll.simulation import simulate

from tests.privacy.test_privacy_run import BASE, INTRINSIC, build


# ------------------------------------------------------------------ item 2: infinite epsilon
# (uniforms, width, clip, dimension, q), rounds: the delta floor reaches 1 after composition.
# On the old code each raised IndexError (or ValueError, or ran out of memory) from dp-accounting.
BLATANT = [((2, 1.0, 0.5, 10, 1.0), 100), ((3, 1.0, 1.0, 50, 0.5), 200),
           ((2, 1.0, 0.9, 100_000, 1.0), 5), ((3, 1.0, 1.4, 5000, 0.5), 5)]


@pytest.mark.parametrize("args, rounds", BLATANT)
def test_gih_epsilon_is_infinite_where_the_delta_floor_reaches_one(args, rounds):
    floor = delta_floor(*args, rounds)
    assert floor > 0.96
    acc = P.Accountant("pld")
    acc.step(P.intrinsic_quantization(*args), rounds)
    assert acc.epsilon(1e-5) == math.inf
    assert acc.epsilon(min(0.5, floor * 0.9)) == math.inf


def test_gih_blatant_subsampled_round_is_the_exact_pair():
    """One round whose unsampled release always has infinite loss, sampled at q = 1/2: delta
    floor q; at delta >= q every epsilon >= 0 holds (remove: q at infinity, 1-q at log(1-q))."""
    acc = P.Accountant("pld")
    acc.step(P.intrinsic_quantization(3, 1.0, 1.4, 5000, 0.5))
    assert acc.epsilon(0.49) == math.inf
    assert acc.epsilon(0.51) == pytest.approx(0.0, abs=1e-3)


def test_intrinsic_config_below_the_delta_floor_is_refused_with_the_reason():
    over = [o for o in INTRINSIC if not o.startswith("privacy.clip")] + ["privacy.clip=5.0"]
    with pytest.raises(config.ConfigError, match="delta floor") as info:
        build(over)
    assert "privacy.delta" in str(info.value) and "Lower privacy.clip" in str(info.value)
    build(INTRINSIC)  # the default intrinsic test config stays accepted


# ------------------------------------------------------------------ item 3: replace-one
EVENTS = {
    "gaussian": P.gaussian(1.0),
    "poisson_gaussian": P.poisson_gaussian(0.05, 1.2),
    "laplace": P.laplace(2.0),
    "fixed_size_gaussian": P.fixed_size_gaussian(256, 60000, 1.1),
}


@pytest.mark.parametrize("name", sorted(EVENTS))
@pytest.mark.parametrize("relation", ["add_remove", "replace_one"])
def test_rdp_is_never_tighter_than_pld(name, relation):
    """Both are upper bounds on the same epsilon, PLD the tight one: RDP >= PLD (up to PLD's
    grid) for every event and relation that both accountants support."""
    answers = {}
    for kind in ("pld", "rdp", "rdp_classic"):
        acc = P.Accountant(kind, relation)
        try:
            acc.step(EVENTS[name], 10)
        except ValueError as exc:
            assert "cannot account" in str(exc)
            continue
        answers[kind] = acc.epsilon(1e-5)
    if "pld" in answers and "rdp" in answers:
        assert answers["rdp"] >= answers["pld"] * (1 - 1e-4)
    if "rdp" in answers:
        assert answers["rdp_classic"] >= answers["rdp"] * (1 - 1e-9)
    supported = {("gaussian", r) for r in ("add_remove", "replace_one")} | {
        ("laplace", r) for r in ("add_remove", "replace_one")} | {("poisson_gaussian", "add_remove")}
    if (name, relation) in supported:
        assert {"pld", "rdp"} <= set(answers)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_replace_one_is_add_remove_at_twice_the_sensitivity(kind):
    """Replacing a record moves the clipped sum by up to 2C: epsilon of z under replace-one is
    epsilon of z/2 under add/remove (the old RDP answered 19.05 where PLD gave 46.21)."""
    for event, halved in ((P.gaussian(1.0), P.gaussian(0.5)), (P.laplace(2.0), P.laplace(1.0))):
        ro, ar = P.Accountant(kind, "replace_one"), P.Accountant(kind, "add_remove")
        ro.step(event, 10), ar.step(halved, 10)
        assert ro.epsilon(1e-5) == pytest.approx(ar.epsilon(1e-5), rel=1e-9)
    ro = P.Accountant("rdp", "replace_one")
    ro.step(P.fixed_size_gaussian(256, 60000, 1.1), 100)
    assert ro.epsilon(1e-5) > 1.5 * _rdp_raw_fixed_size(1.1, 100)


def _rdp_raw_fixed_size(z, count):
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    ref = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    ref.compose(P.fixed_size_gaussian(256, 60000, z), count)
    return ref.get_epsilon(1e-5)


def test_fixed_size_is_dp_accountings_at_half_the_multiplier():
    ro = P.Accountant("rdp", "replace_one")
    ro.step(P.fixed_size_gaussian(256, 60000, 1.1), 100)
    assert ro.epsilon(1e-5) == _rdp_raw_fixed_size(0.55, 100)


@pytest.mark.parametrize("mode", [
    ["privacy.mode=dp_sgd", "privacy.sample_rate=0.1"],
    ["privacy.mode=dp_fedavg", "sampling.method=poisson", "sampling.rate=0.5"],
])
def test_calibrated_replace_one_run_runs_all_its_rounds(mode):
    """Calibration uses privacy.neighboring: the run spends its budget over all its rounds
    (before, calibrated add/remove, accounted replace-one: stopped after half or a quarter)."""
    alg, model, fed, plan = build(mode + ["privacy.target_epsilon=2.0", "privacy.neighboring=replace_one"])
    res = simulate(alg, model, fed, plan, plots=False)
    assert res.state.round == 3
    assert 0.99 * 2.0 < res.metrics[-1]["epsilon"] <= 2.0


def test_local_mode_epsilon_is_the_same_under_both_relations():
    """Local noise is z x 2C under either relation (any record moves the update across the
    ball): the printed epsilon must not double-count the replacement."""
    eps = []
    for rel in ("add_remove", "replace_one"):
        alg, model, fed, plan = build(["privacy.mode=local", "privacy.noise_multiplier=3.0",
                                       f"privacy.neighboring={rel}"])
        res = simulate(alg, model, fed, plan, plots=False)
        eps.append(res.metrics[-1]["epsilon"])
    assert eps[0] == pytest.approx(eps[1], rel=1e-6)


# ------------------------------------------------------------------ item 4: calibration, CLI
@pytest.mark.parametrize("target", [1e-4, 1e-3, 3e-3, 0.1, 1.0])
def test_noise_for_epsilon_meets_tiny_targets_tightly(target):
    """The old search failed ("did not bracket") below epsilon ~0.0035."""
    z = P.noise_for_epsilon(target, 0.01, 1000, 1e-5)
    assert calibrate.epsilon(0.01, z, 1000, 1e-5) <= target
    assert calibrate.epsilon(0.01, z * (1 - 1e-3), 1000, 1e-5) > target


def test_noise_for_epsilon_honours_the_relation():
    for q in (0.01, 1.0):
        z = P.noise_for_epsilon(1.0, q, 100, 1e-5, neighboring="replace_one")
        assert calibrate.epsilon(q, z, 100, 1e-5, neighboring="replace_one") <= 1.0
        assert calibrate.epsilon(q, z * 0.999, 100, 1e-5, neighboring="replace_one") > 1.0


@pytest.mark.parametrize("delta", [0.0, 1.0, 1.5, -1e-5])
def test_delta_outside_zero_one_is_refused(delta):
    acc = P.Accountant("pld")
    acc.step(P.gaussian(1.0))
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        acc.epsilon(delta)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        P.noise_for_epsilon(1.0, 0.01, 100, delta)


def _cli(capsys, *args):
    assert main(["privacy", *args]) == 0
    return capsys.readouterr().out


def test_cli_noise_is_rounded_up_so_the_printed_value_meets_the_target(capsys):
    out = _cli(capsys, "noise", "--q", "0.01", "--steps", "10000", "--epsilon", "1")
    z = float(re.search(r"pld\s*│\s*10000\s*│\s*([0-9.]+)", out).group(1))
    assert z == 3.81325  # the old CLI printed 3.8132, whose epsilon is 1.0000121 > 1
    assert calibrate.epsilon(0.01, z, 10000, 1e-5) <= 1.0


@pytest.mark.parametrize("delta", ["1", "1.5", "0"])
def test_cli_refuses_delta_outside_zero_one(capsys, delta):
    assert main(["privacy", "epsilon", "--q", "0.01", "--steps", "10", "--noise", "1",
                 "--delta", delta]) == 2
    assert "delta must be in (0, 1)" in capsys.readouterr().err


def test_cli_steps_search_is_bounded(capsys):
    """``--noise 0.3 --epsilon 1e6`` ran for minutes; now it stops at --max-steps."""
    out = _cli(capsys, "steps", "--q", "0.01", "--noise", "0.3", "--epsilon", "1e6",
               "--max-steps", "100000")
    assert ">= 100000" in out


@pytest.mark.parametrize("epochs, q, steps", [(3, 0.1, 30), (2, 0.3, 7), (1, 0.01, 100)])
def test_cli_and_runs_count_epochs_alike(capsys, epochs, q, steps):
    """One rule, ceil(E/q), float noise ignored (3/0.1 = 30.000000000000004 is 30 steps)."""
    assert calibrate.steps_for_epochs(epochs, q) == steps
    out = _cli(capsys, "epsilon", "--q", str(q), "--epochs", str(epochs), "--noise", "2",
               "--accountant", "pld")
    assert re.search(rf"pld\s*│\s*{steps}\s*│", out)
    alg, model, fed, plan = build(["privacy.mode=dp_sgd", f"privacy.sample_rate={q}",
                                   "privacy.noise_multiplier=2.0", f"client.epochs={epochs}"],
                                  base=BASE.replace("steps = 2\n", ""))
    assert plan.privacy.events[0][1] == steps


@pytest.mark.parametrize("event", [ev.gaussian(1e-12), ev.poisson_gaussian(0.1, 1e-3),
                                   ev.gaussian(0.02), ev.laplace(1e-6)])
def test_next_to_no_noise_is_infinite_epsilon_not_a_crash(event):
    """Before: dp-accounting tried to allocate 57 GiB for gaussian(0.002) and raised
    ValueError ("Maximum allowed size exceeded") for gaussian(1e-12)."""
    acc = Accountant("pld")
    acc.step(event, 3)
    assert acc.epsilon(1e-5) == math.inf
    assert Accountant("rdp").epsilon_after([(event, 3)], 1e-5) > 100  # RDP agrees it is no privacy
