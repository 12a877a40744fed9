"""Budget arithmetic for DP-SGD style runs: epsilon, noise and steps, each from the other two.

``noise_for_epsilon`` and ``steps_for_budget`` search with a bracket whose upper end always meets
the budget (``epsilon <= target``), and return that end: the answer never merely comes close.
Every function takes the neighbouring relation (``add_remove`` or ``replace_one``) of the
accountant that will account the run, so a calibrated run spends exactly its budget.
"""
from __future__ import annotations

import math

from atoll.privacy import events as ev
from atoll.privacy.accountant import KINDS, Accountant, check_delta

MAX_NOISE = 2.0**40  # a target no noise multiplier up to this meets is refused (the accountant's floor)
MAX_STEPS = 10**7


def steps_for_epochs(epochs: float, q: float) -> int:
    """Local steps for ``epochs`` expected passes at Poisson rate ``q``: ``ceil(epochs / q)``
    (rounding noise of the division ignored: 3 / 0.1 is 30 steps, not 31). The one rule used by
    runs and by ``atoll privacy --epochs``."""
    if not (epochs > 0 and 0 < q <= 1):
        raise ValueError(f"need epochs > 0 and q in (0, 1], got epochs={epochs}, q={q}")
    x = epochs / q
    return max(1, math.ceil(x - 1e-9 * x))


def step_event(q: float, sigma: float, mechanism: str = "gaussian") -> ev.DpEvent:
    """One step: Poisson sampling at rate ``q`` then Gaussian; at ``q = 1`` plainly Gaussian.
    ``mechanism = "laplace"``: Laplace of scale ``sigma`` (no subsampling: ``q`` must be 1)."""
    if mechanism == "laplace":
        if q < 1:
            raise ValueError(f"the Laplace mechanism is accounted without subsampling, got q={q}")
        return ev.laplace(sigma)
    return ev.gaussian(sigma) if q >= 1 else ev.poisson_gaussian(q, sigma)


def epsilon(q: float, sigma: float, steps: int, delta: float, kind: str = "pld",
            neighboring: str = "add_remove", mechanism: str = "gaussian") -> float:
    """epsilon after ``steps`` Poisson-sampled Gaussian steps (rate ``q``, multiplier ``sigma``)."""
    acc = Accountant(kind, neighboring)
    acc.step(step_event(q, sigma, mechanism), steps)
    return acc.epsilon(delta)


def privacy_table(q: float, sigma: float, steps: int, delta: float,
                  kinds: tuple[str, ...] = KINDS, neighboring: str = "add_remove") -> dict[str, float]:
    """``{kind: epsilon}`` for each accountant: the same run under each conversion.

    Pure function of its arguments; ``pld`` <= ``rdp`` <= ``rdp_classic`` up to discretisation.
    """
    return {k: epsilon(q, sigma, steps, delta, k, neighboring) for k in kinds}


def noise_for_epsilon(target_epsilon: float, q: float, steps: int, delta: float,
                      kind: str = "pld", tol: float = 1e-4, neighboring: str = "add_remove",
                      mechanism: str = "gaussian") -> float:
    """The smallest noise multiplier (to relative ``tol``) with epsilon <= ``target_epsilon``.

    Illinois (bracketed regula falsi) on ``log epsilon`` against ``log sigma``; the bracket's
    upper end always meets the target and is what is returned. Stops once the upper end's
    epsilon is within ``tol`` of the target or the bracket is narrower than ``tol``.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    check_delta(delta)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    eps = lambda s: epsilon(q, s, steps, delta, kind, neighboring, mechanism)  # noqa: E731
    g = lambda s: _log_gap(eps(s), target_epsilon)  # noqa: E731
    guess = 1.0
    if kind == "pld" and mechanism == "gaussian":  # RDP is looser and fast: PLD's start
        rel = neighboring if q >= 1 else "add_remove"  # RDP has no Poisson replace-one bound:
        try:  # start from twice the add/remove answer (replacing moves the sum twice as far)
            guess = noise_for_epsilon(target_epsilon, q, steps, delta, "rdp", 1e-2, rel)
            guess *= 1 if rel == neighboring else 2
        except ValueError:  # RDP's conversion has a floor above tiny targets: PLD alone
            pass
    hi, g_hi = guess, g(guess)
    while g_hi > 0:
        if hi >= MAX_NOISE:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE:g} gives epsilon <= "
                             f"{target_epsilon:g} at delta {delta:g} ({kind}, q={q:g}, {steps} steps)")
        hi, g_hi = 2 * hi, g(2 * hi)
    lo, g_lo = hi / 2, g(hi / 2)
    while g_lo <= 0:
        if lo < 1e-6:  # (almost) no noise meets the target: nothing to calibrate
            return lo
        lo, g_lo = lo / 2, g(lo / 2)
    side = 0
    while g_hi < -tol and math.log(hi / lo) > tol:
        a, b = math.log(lo), math.log(hi)
        if math.isfinite(g_lo) and math.isfinite(g_hi):
            x = b - g_hi * (b - a) / (g_hi - g_lo)
            x = min(max(x, a + 0.01 * (b - a)), b - 0.01 * (b - a))
        else:  # an end without a finite epsilon (0 or infinite): bisect
            x = (a + b) / 2
        s, gs = math.exp(x), g(math.exp(x))
        if gs > 0:
            lo, g_lo = s, gs
            g_hi = g_hi / 2 if side == -1 else g_hi  # Illinois: halve the stale end's value
            side = -1
        else:
            hi, g_hi = s, gs
            g_lo = g_lo / 2 if side == 1 else g_lo
            side = 1
    return hi


def _log_gap(e: float, target: float) -> float:
    """``log(e / target)``: positive when the budget is exceeded."""
    if e <= 0:
        return -math.inf
    return math.log(e / target) if math.isfinite(e) else math.inf


def steps_for_budget(target_epsilon: float, q: float, sigma: float, delta: float,
                     kind: str = "pld", max_steps: int = MAX_STEPS,
                     neighboring: str = "add_remove") -> int:
    """Largest number of steps (at most ``max_steps``) with epsilon <= ``target_epsilon``;
    0 if even one step exceeds it. ``max_steps`` bounds the search: a budget that allows
    more returns ``max_steps``.

    For ``pld`` the search starts from the RDP answer (a lower bound: RDP is looser).
    """
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    check_delta(delta)
    eps = lambda t: epsilon(q, sigma, t, delta, kind, neighboring)  # noqa: E731
    if eps(1) > target_epsilon:
        return 0
    lo = 1
    if kind == "pld" and neighboring == "add_remove":
        lo = max(1, steps_for_budget(target_epsilon, q, sigma, delta, "rdp", max_steps))
    if lo >= max_steps:  # RDP's epsilon bounds the true one too: max_steps are within budget
        return max_steps
    hi = min(max(lo + 1, 2 * lo), max_steps)
    while eps(hi) <= target_epsilon:
        if hi >= max_steps:
            return max_steps
        lo, hi = hi, min(2 * hi, max_steps)
    return _bisect_steps(eps, target_epsilon, lo, hi)


def _bisect_steps(eps, target, lo: int, hi: int) -> int:
    while hi - lo > 1:  # invariant: eps(lo) <= target < eps(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if eps(mid) <= target else (lo, mid)
    return lo
