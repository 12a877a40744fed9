"""Simulated Byzantine clients: what the field attacks robust aggregators with.

An ``Adversary`` sits between the clients' decoded updates and the aggregator, in simulation
only: ``adversary(deltas (C, ...), ids, round, key) -> deltas``. The attacking clients trained
honestly (their rows hold their honest updates); from ``start_round`` on, the adversary
replaces their rows. Colluding attackers send one shared vector. Omniscient attacks (ALIE, IPM,
min-max, min-sum) see the honest rows of the round, as they are defined.

Update attacks, ``x_b`` for every attacker, ``mu`` / ``sigma`` the honest mean and coordinate
standard deviation:
- ``sign_flip``: ``-x_own`` (each attacker negates its honest update);
- ``gaussian(sigma)``: ``N(0, sigma^2 I)``;
- ``scaled(s)``: ``s * x_own``;
- ``alie``: ``mu - z sigma``, ``z = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f``
  (Baruch et al. 2019, "A little is enough");
- ``ipm(eps)``: ``-eps * mu`` (Xie et al. 2020, inner product manipulation);
- ``min_max`` / ``min_sum``: ``mu + gamma p``, ``p = -sigma / |sigma|``, the largest ``gamma``
  whose distances to the honest updates stay within theirs (max of distances / sum of squared
  distances; Shejwalkar & Houmansadr, NDSS 2021).
Data attacks (``label_flip``, ``backdoor``) change the attackers' training data instead
(``poison``); ``backdoor`` also boosts their update (model replacement, Bagdasaryan et al. 2020).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atoll import rng
from atoll.aggregators.robust import batched

UPDATE_ATTACKS = ("sign_flip", "gaussian", "scaled", "alie", "ipm", "min_max", "min_sum")
DATA_ATTACKS = ("label_flip", "backdoor")


@dataclass(frozen=True)
class Adversary:
    name: str
    attackers: frozenset
    start_round: int = 1
    scale: float = 10.0      # scaled: factor; backdoor: model-replacement boost
    sigma: float = 200.0     # gaussian: standard deviation
    eps: float = 0.1         # ipm

    def __call__(self, deltas, ids: list[int], round: int, key: int):  # noqa: A002
        bad = [i for i, c in enumerate(ids) if c in self.attackers]
        if round < self.start_round or not bad or self.name == "label_flip":
            return deltas
        like = {k: v[0] for k, v in deltas.items()}
        rows = torch.cat([v.reshape(v.shape[0], -1) for v in deltas.values()], dim=1)  # (C, D)
        good = rows[[i for i in range(len(ids)) if i not in bad]]
        rows = rows.clone()
        rows[bad] = self.malicious(good, rows[bad], rng.fold(key, "attack"))
        return batched(rows, like)

    def malicious(self, honest: torch.Tensor, own: torch.Tensor, key: int) -> torch.Tensor:
        """The attackers' rows ``(f, D)`` from the honest rows ``(h, D)`` and their own ``(f, D)``."""
        f = own.shape[0]
        if self.name == "sign_flip":
            return -own
        if self.name in ("scaled", "backdoor"):
            return self.scale * own
        if self.name == "gaussian":
            g = rng.generator(key)
            return self.sigma * torch.randn(own.shape, generator=g, dtype=own.dtype)
        if honest.shape[0] == 0:
            return own  # nothing to imitate
        mu = honest.mean(dim=0)
        sd = honest.std(dim=0, unbiased=False) if honest.shape[0] > 1 else torch.zeros_like(mu)
        if self.name == "ipm":
            return (-self.eps * mu).expand(f, -1)
        if self.name == "alie":
            n = honest.shape[0] + f
            s = math.floor(n / 2 + 1) - f
            z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((n - s) / n)))
            return (mu - z * sd).expand(f, -1)
        if self.name in ("min_max", "min_sum"):
            return min_max_sum(honest, mu, sd, self.name).expand(f, -1)
        raise ValueError(f"unknown attack {self.name!r}")


def min_max_sum(honest, mu, sd, kind: str, iters: int = 30) -> torch.Tensor:
    """Binary search for the largest ``gamma`` of ``mu - gamma sd/|sd|`` that stays inside the
    honest updates' own spread (max distance, or sum of squared distances)."""
    p = -sd / sd.norm().clamp_min(1e-30)
    d = torch.cdist(honest, honest)
    if kind == "min_max":
        bound = d.max()
        fits = lambda m: (honest - m).norm(dim=1).max() <= bound  # noqa: E731
    else:
        bound = d.square().sum(dim=1).max()
        fits = lambda m: (honest - m).norm(dim=1).square().sum() <= bound  # noqa: E731
    lo, hi = 0.0, 1.0
    while fits(mu + hi * p) and hi < 1e12:
        lo, hi = hi, 2 * hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mu + mid * p) else (lo, mid)
    return mu + lo * p


# --- data attacks ---------------------------------------------------------------------------

def trigger(x: torch.Tensor, value: float) -> torch.Tensor:
    """Stamp a pixel pattern: the last 4 features (the bottom-right corner of an image whose
    rows are laid out in order) set to ``value``."""
    x = x.clone()
    x[..., -4:] = value
    return x


def poison(data, adversary: Adversary, n_classes: int, target: int = 0, fraction: float = 0.5):
    """The attackers' training data under a data attack; other clients' data unchanged.
    ``label_flip``: ``y -> n_classes - 1 - y``. ``backdoor``: a ``fraction`` of each attacker's
    samples stamped with the trigger and labelled ``target``."""
    from dataclasses import replace

    if adversary.name not in DATA_ATTACKS:
        return data
    high = float(max(c.x.max() for c in data.clients if c.n)) if data.clients else 1.0
    clients = list(data.clients)
    for c in sorted(adversary.attackers):
        cd = clients[c]
        x, y = cd.x.clone(), cd.y.clone()
        if adversary.name == "label_flip":
            y = n_classes - 1 - y
        else:
            k = max(1, int(fraction * cd.n))
            x[:k], y[:k] = trigger(x[:k], high), target
        clients[c] = replace(cd, x=x, y=y)
    return replace(data, clients=clients)


def backdoor_success(model_fn, params, test_x, test_y, target: int, high: float) -> float:
    """Fraction of test samples not of class ``target`` that the trigger turns into ``target``."""
    keep = test_y != target
    logits = model_fn(params, trigger(test_x[keep], high))
    return float((logits.argmax(dim=1) == target).float().mean())
