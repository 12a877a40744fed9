"""Privacy of DP intrinsic quantization: the "generalized Irwin-Hall" (GIH) mechanism.

Which noise protects the data (US 11,017,322 B1, FIG. 3/4). A client sends
``Q[g + n + v]`` and the dither ``v`` (as a seed). With a subtractive dither uniform on one
step, the quantization error ``e = Q[x + v] - (x + v)`` is uniform on ``[-D/2, D/2]`` and
independent of ``x = g + n`` (Schuchman 1964). The pair ``(Q[x + v], v)`` is a function of
``y = Q[x + v] - v = x + e`` alone (``v`` is the unique point of ``[-D/2, D/2)`` with
``y + v`` on the lattice ``D*Z``), so the release is post-processing of ``g + n + e``: the
privacy noise is ``n + e``, the sum of ``Z + 1`` independent uniforms of width ``D`` (Irwin-Hall
with ``Z + 1`` terms). The dither itself is *not* noise the server cannot remove; the error it
makes uniform is. (This treats the dither as an ideal continuous uniform; a seeded PRNG and
float rounding make it approximately so.)

Sensitivity model. In units of the client's clipped *sum* ``s = sum_j CL(grad_j)`` (FIG. 4 line
4 times ``N_k``; the step ``D_k = D / N_k`` turns into width ``D``), each per-sample gradient is
clipped to ``[-C, C]`` per coordinate, so adding or removing one record moves ``s`` by a vector
``mu`` with ``|mu_i| <= C``. The noise is a product of ``d`` symmetric log-concave densities, so
the worst case is the corner ``mu = (C, ..., C)`` and the ``d``-dimensional privacy loss is the
sum of ``d`` independent one-dimensional losses: the ``d``-fold self-composition of the 1-D PLD.
Poisson subsampling flips ONE coin per record for all coordinates, so amplification is applied
to the composed ``d``-dimensional pair ``(P, Q)``: remove ``((1-q)P + qQ, P)``, add
``(P, (1-q)P + qQ)`` (composing ``d`` separately subsampled coordinates would be unsound).
Rounds then compose ``T``-fold.

Bounded noise gives a floor on delta: with ``c = C / D``, one coordinate has infinite loss with
probability ``delta_1 = IH_cdf_n(c)``; one round ``q * (1 - (1 - delta_1)^d)``; ``T`` rounds
``1 - (1 - floor_round)^T`` (``delta_floor``). Below it, epsilon is infinite.

Everything goes through dp-accounting: the 1-D loss is an ``AdditiveNoisePrivacyLoss``
(its documented extension point), the PLD is built with its pessimistic connect-the-dots
construction (made symmetric, so it is a valid pair), and composition is its FFT composition.
Subsampling mixes the *probabilities* of the composed pair (``subsample_pld``), never its
hockey-stick curve: every round's PLD is a pair of distributions of mass 1 (checked).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from dp_accounting.pld import privacy_loss_mechanism as plm

from atoll.privacy.symmetric_pld import (PLD, raise_low_losses, sampled_blatant, subsample_pld,
                                         symmetric_connect_dots)

TAIL_MASS = 1e-15  # probability mass that may be pushed (pessimistically) to infinite loss
LOW_LOSS = 8.0  # one coordinate's losses below -LOW_LOSS are raised to it (mass <= e^-8 x tail)
LOSS_CAP = 200.0  # 1-D losses beyond +-LOSS_CAP are rounded up (to infinity / to -LOSS_CAP)


# ---------------------------------------------------------------- Irwin-Hall distribution
def ih_pdf(s, n: int) -> np.ndarray:
    """Density of ``S = U_1 + ... + U_n``, ``U ~ Uniform[0, 1]`` (support ``[0, n]``)."""
    return np.exp(ih_log_pdf(s, n))


def ih_log_pdf(s, n: int) -> np.ndarray:
    """``log`` density; exact power form near the edges, symmetric alternating sum inside."""
    t = np.minimum(np.asarray(s, dtype=np.float64), n - np.asarray(s, dtype=np.float64))
    out = np.full(t.shape, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        edge = (t > 0) & (t < 1)
        out[edge] = (n - 1) * np.log(t[edge]) - math.lgamma(n)
        inner = t >= 1
        if inner.any():
            out[inner] = np.log(_alternating(t[inner], n, n - 1)) - math.lgamma(n)
    return out


def ih_cdf(s, n: int) -> np.ndarray:
    """``P(S <= s)``, using ``F(s) = 1 - F(n - s)`` above the median for accuracy."""
    s = np.asarray(s, dtype=np.float64)
    low = np.clip(np.minimum(s, n - s), 0.0, n / 2)
    f = _alternating(low, n, n) / math.factorial(n)
    return np.clip(np.where(s <= n / 2, f, 1.0 - f), 0.0, 1.0)


def _alternating(t: np.ndarray, n: int, power: int) -> np.ndarray:
    """``sum_{k <= t} (-1)^k C(n, k) (t - k)^power`` for ``0 <= t <= n/2``."""
    total = np.zeros_like(t)
    for k in range(0, n // 2 + 1):
        d = np.maximum(t - k, 0.0)
        total = total + (-1) ** k * math.comb(n, k) * np.where(t - k > 0, d ** power, 0.0)
    return np.maximum(total, 0.0)


def delta_floor(uniforms: int, width: float, sensitivity: float, dimension: int = 1,
                q: float = 1.0, rounds: int = 1) -> float:
    """Exact smallest achievable delta (probability of an infinite privacy loss)."""
    d1 = float(ih_cdf(sensitivity / width, uniforms))
    per_round = q * -math.expm1(dimension * math.log1p(-d1)) if d1 < 1 else q
    return -math.expm1(rounds * math.log1p(-per_round)) if per_round < 1 else 1.0


# ---------------------------------------------------------------- dp-accounting extension
class IrwinHallPrivacyLoss(plm.AdditiveNoisePrivacyLoss):
    """Additive Irwin-Hall noise ``S - n/2`` (width 1) with sensitivity ``c = C / D``.

    The noise is symmetric and log-concave, so the privacy loss is non-increasing in ``x``
    as dp-accounting requires. Support ``[-n/2, n/2]``; losses are infinite off the overlap.
    """

    def __init__(self, uniforms: int, sensitivity: float, sampling_prob: float = 1.0,
                 adjacency_type=plm.AdjacencyType.REMOVE, tail_mass: float = TAIL_MASS):
        if sensitivity >= uniforms:
            raise ValueError(f"sensitivity/width {sensitivity} >= {uniforms}: supports do not overlap")
        self.n = int(uniforms)
        self.tail_mass = tail_mass
        super().__init__(sensitivity, False, sampling_prob, adjacency_type)

    @classmethod
    def from_privacy_guarantee(cls, *args, **kwargs):
        """Not offered: calibrate ``Z`` and the step with ``atoll.privacy.calibrate`` instead."""
        raise NotImplementedError("IrwinHallPrivacyLoss.from_privacy_guarantee")

    def noise_cdf(self, x):
        return ih_cdf(np.add(x, self.n / 2), self.n)

    def noise_log_cdf(self, x):
        with np.errstate(divide="ignore"):
            return np.log(self.noise_cdf(x))

    def _loss(self, x) -> np.ndarray:
        """Unsampled REMOVE loss ``log mu(x + c) - log mu(x)``, vectorised."""
        x = np.asarray(x, dtype=np.float64)
        s = x + self.n / 2
        with np.errstate(invalid="ignore"):
            out = ih_log_pdf(s + self.sensitivity, self.n) - ih_log_pdf(s, self.n)
        out[x <= -self.n / 2] = np.inf
        out[x >= self.n / 2 - self.sensitivity] = -np.inf
        return out

    def _privacy_loss_without_subsampling_remove(self, x: float) -> float:
        return float(self._loss(np.array([x]))[0])

    def _inverse_privacy_loss_without_subsampling_remove(self, privacy_loss: float) -> float:
        return float(self._inverse(np.array([privacy_loss], dtype=np.float64))[0])

    def _inverse(self, eps: np.ndarray) -> np.ndarray:
        """Largest ``x`` with ``loss(x) >= eps``: grid bracket, then vectorised bisection."""
        a, b = -self.n / 2, self.n / 2 - self.sensitivity
        grid = np.linspace(a, b, 4097)
        neg = -self._loss(grid)  # non-decreasing
        idx = np.clip(np.searchsorted(neg, -eps, side="right") - 1, 0, grid.size - 1)
        lo, hi = grid[idx], grid[np.minimum(idx + 1, grid.size - 1)]
        for _ in range(45):
            mid = 0.5 * (lo + hi)
            ok = self._loss(mid) >= eps
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
        return np.where(idx == grid.size - 1, b, lo)

    def get_delta_for_epsilon(self, epsilon):
        """Vectorised hockey-stick divergence (unsampled); sampled cases use dp-accounting's."""
        if self.sampling_prob != 1.0:
            return super().get_delta_for_epsilon(epsilon)
        eps = np.atleast_1d(np.asarray(epsilon, dtype=np.float64))
        x = self._inverse(eps)
        with np.errstate(over="ignore"):
            out = self.mu_upper_cdf(x) - np.exp(eps + self.mu_lower_log_cdf(x))
        out = np.clip(out, 0.0, 1.0)
        return float(out[0]) if np.isscalar(epsilon) else out

    def _tail_x(self, upper: bool) -> float:
        """x beyond which at most ``tail_mass`` of finite-loss mass of mu_upper remains."""
        a, b = -self.n / 2, self.n / 2 - self.sensitivity
        cdf = lambda x: float(self.mu_upper_cdf(np.array([x]))[0])  # noqa: E731
        base = cdf(a)
        lo, hi = a, b
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            inside = (1.0 - cdf(mid) > self.tail_mass) if upper else (cdf(mid) - base <= self.tail_mass)
            lo, hi = (mid, hi) if inside else (lo, mid)
        return lo if not upper else hi

    def privacy_loss_tail(self) -> plm.TailPrivacyLossDistribution:
        lo, hi = self._tail_x(False), self._tail_x(True)
        return plm.TailPrivacyLossDistribution(lo, hi, {
            math.inf: float(self.mu_upper_cdf(np.array([lo]))[0]),
            self.privacy_loss(hi): 1.0 - float(self.mu_upper_cdf(np.array([hi]))[0])})

    def connect_dots_bounds(self) -> plm.ConnectDotsBounds:
        """Losses at the tail cuts, capped at +-LOSS_CAP (beyond: pessimistic)."""
        lo, hi = self._tail_x(False), self._tail_x(True)
        return plm.ConnectDotsBounds(epsilon_upper=min(self.privacy_loss(lo), LOSS_CAP),
                                     epsilon_lower=max(self.privacy_loss(hi), -LOSS_CAP))


def one_dimensional_pld(uniforms: int, ratio: float, disc: float, stride: int = 8) -> PLD:
    """Symmetric PLD of one coordinate, unsampled; ``ratio = C / D``.

    The exact hockey-stick curve is evaluated on every ``stride``-th grid epsilon and joined by
    chords in ``alpha = e^eps``: ``delta(alpha)`` is convex (a supremum of affine functions), so
    a chord lies above it and the PLD stays pessimistic.
    """
    loss = IrwinHallPrivacyLoss(uniforms, ratio)
    hi = max(2, math.ceil(loss.connect_dots_bounds().epsilon_upper / disc))
    grid = np.unique(np.concatenate([np.arange(0, hi + 1, stride), [hi]]))
    pmf = symmetric_connect_dots(grid, loss.get_delta_for_epsilon(grid * disc), disc)
    return PLD(raise_low_losses(pmf, LOW_LOSS))


@functools.lru_cache(maxsize=32)
def round_pld(uniforms: int, width: float, sensitivity: float, dimension: int, q: float,
              disc: float) -> PLD | None:
    """PLD of one GIH round (``None``: no privacy, the supports do not overlap)."""
    ratio = sensitivity / width
    if ratio >= uniforms:
        return None
    if delta_floor(uniforms, width, sensitivity, dimension) >= 1 - 1e-12:
        # almost every unsampled release has infinite loss (composing d coordinates would leave
        # no finite mass, and needs memory that grows with d): the release is non-private,
        # and subsampling leaves exactly the pair "sampled: infinite loss, else nothing"
        return None if q >= 1.0 else sampled_blatant(q, disc)
    pld = one_dimensional_pld(uniforms, ratio, disc)
    if dimension > 1:
        pld = pld.self_compose(dimension, tail_mass_truncation=TAIL_MASS)
    return subsample_pld(pld, q, disc)


def hockey_stick_1d(uniforms: int, ratio: float, q: float, eps: float) -> float:
    """Oracle: ``max(remove, add)`` hockey-stick divergence of ONE subsampled coordinate by
    direct adaptive quadrature (``scipy.integrate.quad``) of the densities; no PLD involved."""
    from scipy import integrate

    n, c, a = uniforms, ratio, math.exp(eps)
    f = lambda x: float(ih_pdf(np.array([x + n / 2]), n)[0])  # noqa: E731
    rem = lambda x: max(0.0, (1 - q) * f(x) + q * f(x + c) - a * f(x))  # noqa: E731
    add = lambda x: max(0.0, f(x) - a * ((1 - q) * f(x) + q * f(x - c)))  # noqa: E731
    knots = sorted({k - n / 2 + s for k in range(n + 1) for s in (-c, 0.0, c)})
    out = []
    for fn, lo, hi in ((rem, -n / 2 - c, n / 2), (add, -n / 2, n / 2 + c)):
        pts = [p for p in knots if lo < p < hi]
        out.append(integrate.quad(fn, lo, hi, points=pts, limit=500, epsabs=1e-13, epsrel=1e-11)[0])
    return max(out)
