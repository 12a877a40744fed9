"""Privacy loss distributions of *symmetric* pairs built from dp-accounting's pmfs: the
pessimistic connect-the-dots pmf, and Poisson subsampling with one coin for the whole release
(the GIH mechanism's rounds, ``atoll.privacy.irwin_hall``).

Every result is a valid pair (both sides sum to 1; checked after subsampling) that dominates
the true one.
"""
from __future__ import annotations

import math

import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib

PLD = pld_lib.PrivacyLossDistribution
CUT_MASS = 1e-12  # at most this much of a round's largest losses goes to infinity (with the FFT's
#                   rounding noise, ~1e-17 per bin, beyond the real support)
MASS_TOLERANCE = 1e-9  # a subsampled round's pmf must have mass 1 within this


def symmetric_connect_dots(grid: np.ndarray, deltas: np.ndarray, disc: float) -> pld_pmf.DensePLDPmf:
    """Pessimistic connect-the-dots pmf of a *symmetric* pair from ``deltas[j] = H(grid[j] * disc)``
    at increasing integers ``grid`` from 0 (the last delta becomes the mass at infinity).

    dp-accounting's construction (Doroshenko et al. 2022, Alg. 1): ``H`` linear in
    ``alpha = e^eps`` between the points, so the mass at a point is ``alpha`` times the change of
    slope there. Negative epsilon follows from symmetry, ``H(-e) = 1 - a + a H(e)`` (``a = e^-e``):
    the mass at ``-e`` is ``e^-e`` times the mass at ``e``. Computing it so avoids differences of
    ``H`` near 1, whose rounding noise the other side of the pair (``e^-loss`` x mass) would
    amplify. The result is a valid pair (both sides sum to 1) dominating the true one.
    """
    deltas = np.minimum.accumulate(np.clip(np.asarray(deltas, dtype=np.float64), 0.0, 1.0))
    alpha = np.exp(np.asarray(grid) * disc)
    if grid[0] != 0 or alpha.size < 2:
        raise ValueError("symmetric_connect_dots needs a grid 0, e_1, ... of two points or more")
    a1 = 1 / alpha[1]  # the mirror point -e_1: H = 1 - a1 + a1 H(e_1)
    first = (deltas[0] - (1 - a1 + a1 * deltas[1])) / (1 - a1)
    slopes = np.concatenate([[first], np.diff(deltas) / np.diff(alpha), [0.0]])
    w = np.maximum(alpha * np.diff(slopes), 0.0)  # masses at the grid points
    probs = np.zeros(2 * grid[-1] + 1)
    probs[grid[-1] + grid] = w
    probs[grid[-1] - grid[1:]] = w[1:] / alpha[1:]
    return pld_pmf.DensePLDPmf(disc, -int(grid[-1]), probs, float(deltas[-1]), True)


def raise_low_losses(pmf: pld_pmf.DensePLDPmf, floor: float) -> pld_pmf.DensePLDPmf:
    """The mass at losses below ``-floor`` moved up to ``-floor`` (pessimistic): by symmetry it
    is at most ``e^-floor`` of the mass above ``floor``, but it would widen every composition."""
    cut = max(0, -pmf._lower_loss - math.ceil(floor / pmf._discretization))  # noqa: SLF001
    probs = pmf._probs[cut:].copy()  # noqa: SLF001
    probs[0] += pmf._probs[:cut].sum()  # noqa: SLF001
    return pld_pmf.DensePLDPmf(pmf._discretization, pmf._lower_loss + cut, probs,  # noqa: SLF001
                               pmf._infinity_mass, True)  # noqa: SLF001


def subsample_pld(pld: PLD, q: float, disc: float, tail_mass: float = CUT_MASS) -> PLD:
    """Poisson-subsample the PLD of a *symmetric* pair ``(Q, P)`` (one coin for the whole release).

    Mixing happens on probabilities. The pmf is the law of the loss ``l = log Q/P`` under ``Q``;
    under ``P`` a bin at ``l`` weighs ``e^-l`` times as much, and by symmetry the law under ``P``
    is the mirror of the law under ``Q``. So only the bins ``l >= 0`` are read (the others are
    FFT noise after composition): ``Q`` at ``-l`` is ``e^-l`` times ``Q`` at ``l``. ``m`` = the
    mass at infinity (outcomes only ``Q`` gives; as much only ``P`` gives, by symmetry), to which
    the largest losses and their mirrors move, up to ``tail_mass`` (pessimistic, still a pair).

    Remove, ``((1-q)P + qQ, P)``: loss ``log(1-q + q e^l)`` with mass ``q Q_l + (1-q) P_l``;
    ``(1-q) m`` at ``log(1-q)``; ``q m`` at infinity. Add, ``(P, (1-q)P + qQ)``: loss
    ``-log(1-q + q e^l)`` with mass ``P_l``; ``m`` at ``-log(1-q)``. Each loss is then split
    between its two grid neighbours keeping both sides' masses (connect-the-dots of one atom:
    pessimistic), so the result is again a valid pair; its mass is checked to be 1.
    """
    if q >= 1.0:
        return pld
    if not pld._symmetric:  # noqa: SLF001 (dp-accounting exposes no accessor)
        raise ValueError("subsample_pld needs a symmetric (unsampled) PLD")
    pmf = pld._pmf_remove.to_dense_pmf()  # noqa: SLF001
    zero, probs = -pmf._lower_loss, np.maximum(pmf._probs, 0.0)  # noqa: SLF001
    pos = probs[zero:] if zero >= 0 else np.concatenate([np.zeros(-zero), probs])
    loss = np.arange(pos.size) * pmf._discretization  # noqa: SLF001
    both = pos * (1 + np.exp(-loss))  # a bin at l and its mirror at -l: their mass, both sides
    tail = np.cumsum(both[::-1])[::-1]  # losses >= l; up to tail_mass of them go to the atoms
    keep = max(2, int(np.searchsorted(-tail, -tail_mass, side="right")))
    m = float(pmf._infinity_mass) + float(tail[keep]) if keep < pos.size else float(pmf._infinity_mass)  # noqa: SLF001
    pos, loss = pos[:keep], loss[:keep]
    mass_q = np.concatenate([(pos[1:] * np.exp(-loss[1:]))[::-1], pos])  # losses -L .. L
    mass_p = mass_q[::-1]
    g = np.logaddexp(math.log1p(-q), math.log(q) + np.concatenate([-loss[:0:-1], loss]))
    remove = _split_pmf(np.append(g, math.log1p(-q)),
                        np.append(q * mass_q + (1 - q) * mass_p, (1 - q) * m), q * m, disc)
    add = _split_pmf(np.append(-g, -math.log1p(-q)), np.append(mass_p, m), 0.0, disc)
    return PLD(remove, add)


def _split_pmf(losses: np.ndarray, probs: np.ndarray, inf_mass: float,
               disc: float) -> pld_pmf.DensePLDPmf:
    """A pmf on the grid ``disc * Z`` from masses at any finite losses: each mass goes to its two
    grid neighbours so that both it and its ``e^-loss``-weighted mass are kept."""
    k = np.floor(losses / disc)
    up = probs * np.expm1(-(losses / disc - k) * disc) / math.expm1(-disc)  # upper neighbour's share
    lo = int(k.min())
    idx = (k - lo).astype(np.int64)
    out = np.bincount(idx, weights=probs - up, minlength=int(idx.max()) + 2)
    out += np.bincount(idx + 1, weights=up, minlength=out.size)
    total = float(out.sum()) + inf_mass
    if not abs(total - 1.0) <= MASS_TOLERANCE:
        raise ArithmeticError(f"subsampled PLD has mass {total!r}, not 1 (within {MASS_TOLERANCE:g})")
    return pld_pmf.DensePLDPmf(disc, lo, out, inf_mass, True)


def sampled_blatant(q: float, disc: float) -> PLD:
    """Poisson subsampling (rate ``q``) of a release whose loss is always infinite: remove has
    ``q`` at infinity and ``1 - q`` at ``log(1-q)``; add has all its mass at ``-log(1-q)``."""
    remove = _split_pmf(np.array([math.log1p(-q)]), np.array([1.0 - q]), q, disc)
    add = _split_pmf(np.array([-math.log1p(-q)]), np.array([1.0]), 0.0, disc)
    return PLD(remove, add)
