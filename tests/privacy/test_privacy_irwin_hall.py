"""The generalized Irwin-Hall mechanism: PLD against direct integration, the delta floor,
one-coin subsampling of the d-dimensional release, composition in the accountant."""
import math

import numpy as np
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import stats

from atoll import privacy as P
from atoll.privacy import irwin_hall as ih
from atoll.privacy.symmetric_pld import CUT_MASS

DISC = 1e-4


def test_irwin_hall_cdf_and_pdf_match_sums_of_uniforms():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 6):
        s = torch.rand(200_000, n, generator=g, dtype=torch.float64).sum(1).numpy()
        assert stats.kstest(s, lambda v: ih.ih_cdf(v, n)).pvalue > 0.01
        if n == 1:
            continue  # a step density: the trapezoid rule below would need the jumps
        x = np.linspace(0, n, 200_001)
        integral = np.concatenate([[0], np.cumsum((ih.ih_pdf(x[1:], n) + ih.ih_pdf(x[:-1], n)) / 2 * np.diff(x))])
        assert np.abs(integral - ih.ih_cdf(x, n)).max() < 1e-6


@pytest.mark.parametrize("n,ratio,q", [(2, 0.1, 1.0), (3, 0.3, 0.2), (5, 0.5, 0.05)])
def test_one_round_pld_matches_quadrature_of_the_hockey_stick(n, ratio, q):
    """Pessimistic (never below the truth) and tight (within 1e-8) on one coordinate."""
    pld = ih.round_pld(n, 1.0, ratio, 1, q, DISC)
    for eps in (0.0, 0.3, 1.0, 2.0):
        exact = ih.hockey_stick_1d(n, ratio, q, eps)
        assert 0 <= pld.get_delta_for_epsilon(eps) - exact < 1e-8


def test_pld_is_scale_invariant_in_width():
    a = ih.round_pld(3, 2.0, 0.6, 1, 0.2, DISC)
    b = ih.round_pld(3, 1.0, 0.3, 1, 0.2, DISC)
    assert a.get_epsilon_for_delta(0.01) == b.get_epsilon_for_delta(0.01)


def _grid_2d(n, c, q, eps):
    x = np.linspace(-n / 2 - c, n / 2, 3001)
    h = x[1] - x[0]
    f, fu = ih.ih_pdf(x + n / 2, n), ih.ih_pdf(x + c + n / 2, n)
    p, qq = np.outer(f, f), np.outer(fu, fu)
    mix = (1 - q) * p + q * qq
    rem = np.maximum(mix - math.exp(eps) * p, 0).sum() * h * h
    add = np.maximum(p - math.exp(eps) * mix, 0).sum() * h * h
    return max(rem, add)


def test_two_coordinates_one_coin_matches_2d_integration_and_per_coordinate_coins_are_unsound():
    n, c, q = 2, 0.3, 0.3
    good = ih.round_pld(n, 1.0, c, 2, q, DISC)
    one = ih.round_pld(n, 1.0, c, 1, q, DISC)
    wrong = one.compose(one)  # each coordinate subsampled on its own
    for eps in (0.2, 0.5, 1.0):
        exact = _grid_2d(n, c, q, eps)
        assert good.get_delta_for_epsilon(eps) == pytest.approx(exact, abs=2e-6)
        assert wrong.get_delta_for_epsilon(eps) < exact - 1e-3  # would understate delta


@pytest.mark.parametrize("n,ratio,d,q,rounds", [(2, 0.1, 1, 1.0, 1), (3, 0.2, 10, 0.05, 10), (4, 0.05, 100, 0.01, 50)])
def test_delta_floor_closed_form_and_infinite_epsilon_below_it(n, ratio, d, q, rounds):
    d1 = ratio ** n / math.factorial(n)  # IH cdf at ratio < 1
    floor = 1 - (1 - q * (1 - (1 - d1) ** d)) ** rounds
    assert ih.delta_floor(n, 1.0, ratio, d, q, rounds) == pytest.approx(floor, rel=1e-12)
    acc = P.Accountant("pld")
    acc.step(P.intrinsic_quantization(n, 1.0, ratio, d, q), rounds)
    assert floor <= acc.delta(1e6) < floor + 1e-12  # pessimistic tails add at most ~1e-13
    assert acc.epsilon(floor * 0.99) == math.inf
    assert acc.epsilon(min(1.0, floor * 1.01 + 1e-12)) < math.inf


def test_subsample_pld_reproduces_dp_accountings_subsampled_gaussian():
    mine = ih.subsample_pld(pld_lib.from_gaussian_mechanism(1.0, value_discretization_interval=DISC), 0.1, DISC)
    ref = pld_lib.from_gaussian_mechanism(1.0, value_discretization_interval=DISC, sampling_prob=0.1)
    for eps in (-0.05, 0.0, 0.3, 1.0):
        assert mine.get_delta_for_epsilon(eps) == pytest.approx(ref.get_delta_for_epsilon(eps), abs=1e-10)
    assert mine.self_compose(100).get_epsilon_for_delta(1e-5) == pytest.approx(
        ref.self_compose(100).get_epsilon_for_delta(1e-5), abs=1e-3)


def test_accountant_composes_rounds_and_rdp_refuses():
    ev = P.intrinsic_quantization(4, 1.0, 0.05, 20, 0.05)
    acc = P.Accountant("pld")
    acc.step(ev, 30)
    direct = ih.round_pld(4, 1.0, 0.05, 20, 0.05, DISC).self_compose(30)
    assert acc.delta(2.0) == pytest.approx(direct.get_delta_for_epsilon(2.0), rel=1e-8)
    fewer = P.Accountant("pld")
    fewer.step(ev, 10)
    assert fewer.delta(2.0) < acc.delta(2.0)
    with pytest.raises(ValueError, match="cannot account"):
        P.Accountant("rdp").step(ev)
    no_overlap = P.Accountant("pld")
    no_overlap.step(P.intrinsic_quantization(2, 1.0, 2.5, 1))
    assert no_overlap.epsilon(0.5) == math.inf


def _mass(pmf):
    """Total mass and ``sum p e^-loss`` (the lower distribution's mass) of a PLD pmf."""
    pmf = pmf.to_dense_pmf()
    losses = (pmf._lower_loss + np.arange(pmf._probs.size)) * pmf._discretization
    return pmf._probs.sum() + pmf._infinity_mass, (pmf._probs * np.exp(-losses)).sum()


def test_subsampled_round_of_many_coordinates_is_a_valid_pair():
    """Issue 17.1: mixing on the d-fold curve gave mass 1.027 at d = 650 (1.21 at 20,000).
    Both directions must be pairs of probability distributions: mass 1, and the lower side
    (``sum p e^-loss``) 1 for remove, ``1 - q x (mass at infinity of the d-fold pair)`` for add."""
    q = 0.2
    pld = ih.round_pld(6, 20.0, 0.5, 1000, q, DISC)
    floor = ih.delta_floor(6, 20.0, 0.5, 1000, q, 1)
    (mass_r, low_r), (mass_a, low_a) = _mass(pld._pmf_remove), _mass(pld._pmf_add)
    assert abs(mass_r - 1) < 1e-9 and abs(mass_a - 1) < 1e-9
    assert abs(low_r - 1) < 1e-9
    assert 1 - floor - 1e-9 < low_a <= 1 + 1e-9  # the add side's infinite-loss part is the floor
    assert floor <= pld._pmf_remove._infinity_mass <= floor + q * (CUT_MASS + 1001 * ih.TAIL_MASS)


@pytest.mark.slow
def test_subsampled_round_at_twenty_thousand_coordinates_has_mass_one():
    pld = ih.round_pld(6, 20.0, 0.5, 20_000, 0.2, DISC)
    assert abs(_mass(pld._pmf_remove)[0] - 1) < 1e-9 and abs(_mass(pld._pmf_add)[0] - 1) < 1e-9


def test_epsilon_of_many_coordinates_does_not_rise_as_the_grid_refines():
    """Issue 17.1: Z=5, step 20, C=0.5, d=650, q=0.2, T=20 gave 5.594 / 5.667 / 6.172 on grids
    2e-4 / 1e-4 / 5e-5; a pessimistic method must converge from above (5.582 exact)."""
    ev = P.intrinsic_quantization(6, 20.0, 0.5, 1000, 0.2)
    eps = []
    for disc in (4e-4, 2e-4, 1e-4):
        acc = P.Accountant("pld", discretization=disc)
        acc.step(ev, 20)
        eps.append(acc.epsilon(1e-5))
    assert eps[0] >= eps[1] >= eps[2] - 1e-9
    assert eps[0] - eps[1] < 1e-2 and eps[1] - eps[2] < 0.5 * (eps[0] - eps[1])  # converging


def test_subsampling_on_probabilities_is_sandwiched_by_dp_accountings_rounding():
    """The fast subsampling (masses split between grid neighbours) against dp-accounting's
    ``from_two_probability_mass_functions`` on the same d-dimensional pair (outcome = loss bin,
    Q's mass from the composed pmf, P's = e^-loss x Q's; one atom each for the outcomes only Q
    or only P gives): between its optimistic (round down) and pessimistic (round up) results."""
    disc, q, d = 2e-3, 0.2, 1000
    composed = ih.one_dimensional_pld(6, 0.5 / 20, disc).self_compose(d, tail_mass_truncation=ih.TAIL_MASS)
    mine = ih.subsample_pld(composed, q, disc)
    pmf = composed._pmf_remove.to_dense_pmf()
    pos = np.maximum(pmf._probs[-pmf._lower_loss:], 0)
    big_q = {}
    for i in np.flatnonzero(pos > 0):
        big_q[i], big_q[-i] = pos[i], pos[i] * math.exp(-i * disc)
    big_p = {i: v * math.exp(-i * disc) for i, v in big_q.items()}
    m = pmf._infinity_mass
    upper = {i: math.log(q * big_q[i] + (1 - q) * big_p[i]) for i in big_q}
    lower = {i: math.log(big_p[i]) for i in big_q}
    upper["only Q"], upper["only P"], lower["only P"] = math.log(q * m), math.log((1 - q) * m), math.log(m)
    refs = [pld_lib.from_two_probability_mass_functions(lower, upper, pessimistic_estimate=pess,
                                                         value_discretization_interval=disc, symmetric=False)
            for pess in (False, True)]
    for eps in (-0.1, 0.0, 0.2, 0.5, 1.0, 2.0):
        lo, hi = (r.get_delta_for_epsilon(eps) for r in refs)
        assert lo - 1e-12 <= mine.get_delta_for_epsilon(eps) <= hi + 1e-12
    assert refs[1].get_delta_for_epsilon(0.5) - refs[0].get_delta_for_epsilon(0.5) > 1e-4  # not trivial
