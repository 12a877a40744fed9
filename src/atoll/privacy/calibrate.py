"""Budget arithmetic for DP-SGD style runs: epsilon, noise and steps, each from the other two.

All three use dp-accounting: ``privacy_table`` composes the events, ``noise_for_epsilon`` and
``steps_for_budget`` call ``dp_accounting.mechanism_calibration.calibrate_dp_mechanism``
(bracket search + Brent's method), which guarantees the returned parameter meets the budget
(epsilon <= target), never merely comes close to it.
"""
from __future__ import annotations

from dp_accounting import mechanism_calibration as mc

from atoll.privacy import events as ev
from atoll.privacy.accountant import KINDS, Accountant


def _run(q: float, sigma: float, steps: int):
    return ev.repeated(ev.poisson_gaussian(q, sigma), steps)


def epsilon(q: float, sigma: float, steps: int, delta: float, kind: str = "pld") -> float:
    """epsilon after ``steps`` Poisson-sampled Gaussian steps (rate ``q``, multiplier ``sigma``)."""
    acc = Accountant(kind)
    acc.step(ev.poisson_gaussian(q, sigma), steps)
    return acc.epsilon(delta)


def privacy_table(q: float, sigma: float, steps: int, delta: float,
                  kinds: tuple[str, ...] = KINDS) -> dict[str, float]:
    """``{kind: epsilon}`` for each accountant: the same run under each conversion.

    Pure function of its arguments; ``pld`` <= ``rdp`` <= ``rdp_classic`` up to discretisation.
    """
    return {k: epsilon(q, sigma, steps, delta, k) for k in kinds}


def noise_for_epsilon(target_epsilon: float, q: float, steps: int, delta: float,
                      kind: str = "pld", tol: float = 1e-3) -> float:
    """Smallest noise multiplier (within ``tol``) with epsilon <= ``target_epsilon``.

    For ``pld`` the search is bracketed by the (fast, looser) RDP answer ``s_rdp``: PLD needs
    no more noise, so the answer lies in ``[s_rdp / 4, s_rdp]``.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    bracket = mc.LowerEndpointAndGuess(0.1, 1.0)
    if kind == "pld":
        hi = noise_for_epsilon(target_epsilon, q, steps, delta, "rdp", tol)
        bracket = mc.ExplicitBracketInterval(hi / 4, hi)
    return float(mc.calibrate_dp_mechanism(
        Accountant(kind).fresh, lambda s: _run(q, s, steps), target_epsilon, delta,
        bracket_interval=bracket, tol=tol))


def steps_for_budget(target_epsilon: float, q: float, sigma: float, delta: float,
                     kind: str = "pld", max_steps: int = 10**7) -> int:
    """Largest number of steps with epsilon <= ``target_epsilon`` (0 if even one step exceeds).

    For ``pld`` the search starts from the RDP answer (a lower bound: RDP is looser).
    """
    eps = lambda t: epsilon(q, sigma, t, delta, kind)  # noqa: E731
    if eps(1) > target_epsilon:
        return 0
    lo = steps_for_budget(target_epsilon, q, sigma, delta, "rdp", max_steps) if kind == "pld" else 1
    hi = max(lo + 1, 2 * lo)
    while hi < max_steps and eps(hi) <= target_epsilon:
        lo, hi = hi, min(2 * hi, max_steps)
    if eps(hi) <= target_epsilon:
        return hi
    while hi - lo > 1:  # invariant: eps(lo) <= target < eps(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if eps(mid) <= target_epsilon else (lo, mid)
    return lo
