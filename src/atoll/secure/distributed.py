"""Distributed DP under the secure sum: the Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS
2021, "The Skellam Mechanism for Differentially Private Federated Learning").

Each client clips its update to L2 norm ``clip``, scales it by ``scale`` (integer units), rounds
it to integers by conditional randomized rounding (re-drawn until the rounded vector's norm is
at most ``delta2``, the L2 sensitivity the accountant is told), and adds Skellam noise
``Poisson(mu_i) - Poisson(mu_i)`` per coordinate, all from its own key (its secret in
deployment). The secure sum then carries ``sum_i x_i + Skellam(k mu_i)``: the server sees the
noisy sum only, and no party ever sees a single client's noise-free vector. With at least
``k`` clients in the sum the total noise has variance ``2 mu >= (z delta2)^2``, the Gaussian
mechanism's at noise multiplier ``z``; a round with fewer survivors than ``k`` is refused (its
noise would be smaller than promised).

Privacy (per round, for one client's vector replaced by zero; twice the sensitivity under
``replace_one``): Skellam RDP (their Theorem 3.5), ``eps(a) <= a D2^2 / (4 mu) + ((2a - 1) D2^2
+ 6 D1) / (16 mu^2)``, accounted as ``(xi, rho)``-zCDP with ``rho = D2^2/(4 mu) + D2^2/(8 mu^2)``
and ``xi = 3 D1 / (8 mu^2)`` (an upper bound of that curve), ``D1 <= min(sqrt(d) D2, D2^2)``.
No amplification by sampling is claimed.

Bits: the modular sum of ``n`` clients never wraps while ``n (clip scale + 1) + 12 sqrt(2 mu)
< 2^(bits - 1)``; ``plan`` picks the largest ``scale`` that fits ``bits`` and a decoded
coordinate beyond that bound fails the round (a wrap, or a client outside its range).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TAILS = 12.0  # standard deviations of the summed noise kept inside the ring
BETA = math.exp(-0.5)  # conditional rounding: the norm bound fails with probability <= BETA per draw


@dataclass(frozen=True)
class Skellam:
    clip: float          # L2 clip of a client's update
    scale: float         # integer units per unit of the update
    mu: float            # total Skellam parameter of the sum (variance 2 mu)
    clients: int         # k: the fewest clients whose noise adds up to mu
    delta2: float        # L2 sensitivity of one client's integer vector (after rounding)
    delta1: float        # L1 sensitivity
    bound: float         # |summed coordinate| beyond this: wrapped or out of range

    @property
    def mu_client(self) -> float:
        return self.mu / self.clients

    def zcdp(self, factor: float = 1.0) -> tuple[float, float]:
        """``(rho, xi)`` of one round; ``factor`` 2 under ``replace_one``."""
        d2, d1, mu = self.delta2 * factor, self.delta1 * factor, self.mu
        return d2 ** 2 / (4 * mu) + d2 ** 2 / (8 * mu ** 2), 3 * d1 / (8 * mu ** 2)

    def encode(self, flat: np.ndarray, g: np.random.Generator) -> np.ndarray:
        """A client's integer vector: clip, scale, conditional rounding, its Skellam noise."""
        norm = float(np.linalg.norm(flat))
        x = flat * (min(1.0, self.clip / norm) if norm > 0 else 1.0) * self.scale
        low = np.floor(x)
        for _ in range(1000):
            r = low + (g.random(x.shape) < x - low)
            if float(np.linalg.norm(r)) <= self.delta2:
                break
        else:  # probability <= BETA^1000: a bound that cannot be met
            raise ValueError("secure: conditional rounding did not meet the norm bound")
        mu = self.mu_client
        return (r + g.poisson(mu, x.shape) - g.poisson(mu, x.shape)).astype(np.int64)

    def decode(self, total: np.ndarray, survivors: int) -> np.ndarray:
        """The mean update from the noisy integer sum of ``survivors`` clients."""
        if survivors < self.clients:
            raise ValueError(f"secure: {survivors} clients survived, fewer than the "
                             f"{self.clients} whose noise the privacy guarantee counts on")
        worst = float(np.abs(total).max()) if total.size else 0.0
        if worst > self.bound:
            raise ValueError(f"secure: a summed coordinate ({worst:.0f}) is beyond the ring's "
                             f"bound {self.bound:.0f}: the sum wrapped or a client sent out-of-range values")
        return total.astype(np.float64) / (self.scale * survivors)


def plan(clip: float, z: float, d: int, clients: int, n_max: int, bits: int) -> Skellam:
    """The largest ``scale`` whose sum of ``n_max`` clients fits ``bits`` signed bits, and the
    noise ``mu`` for noise multiplier ``z`` with at least ``clients`` clients in the sum."""
    if not (clip > 0 and z > 0 and d > 0 and 1 <= clients <= n_max and 8 <= bits <= 62):
        raise ValueError(f"secure: distributed noise needs clip > 0, z > 0, 1 <= clients <= n, "
                         f"8 <= bits <= 62; got clip={clip}, z={z}, clients={clients}, "
                         f"n={n_max}, bits={bits}")
    top = 2.0 ** (bits - 1)
    lo, hi = 0.0, top  # bisection on the scale: the bound grows with it
    for _ in range(200):
        s = (lo + hi) / 2
        if _sized(clip, z, d, clients, n_max, s).bound < top:
            lo = s
        else:
            hi = s
    if lo * clip < 1.0:
        raise ValueError(f"secure.bits = {bits} leaves less than one integer step per clip for "
                         f"{n_max} clients at noise multiplier {z}: raise secure.bits")
    return _sized(clip, z, d, clients, n_max, lo)


def _sized(clip, z, d, clients, n_max, s) -> Skellam:
    c = clip * s
    delta2 = math.sqrt(c ** 2 + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (c + math.sqrt(d) / 2))
    delta1 = min(math.sqrt(d) * delta2, delta2 ** 2)
    mu = (z * delta2) ** 2 / 2  # total variance 2 mu = (z delta2)^2
    bound = n_max * (c + 1) + TAILS * math.sqrt(2 * mu)
    return Skellam(clip, s, mu, clients, delta2, delta1, bound)
