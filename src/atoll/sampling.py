"""Client selection per round, reproducible from ``rng.key(seed, round, SERVER, "sample")``,
and which sampled clients straggle (``rng.key(seed, round, client, "straggler")``).

* ``fixed``: a fixed count (or a fraction of the population) without replacement;
* ``poisson``: each client joins independently with probability ``rate`` (the cohort size
  varies and may be empty); this is the sampling that privacy amplification assumes.
"""
from __future__ import annotations

import math

import torch

from atoll import rng


def sample(num_clients: int, round: int, seed: int, *, method: str = "fixed",  # noqa: A002
           count: int | None = None, fraction: float | None = None,
           rate: float | None = None) -> list[int]:
    """Sorted ids of the clients sampled in ``round``."""
    g = rng.generator(rng.key(seed, round, rng.SERVER, "sample"))
    if method == "fixed":
        k = count if count is not None else max(1, math.ceil((fraction or 1.0) * num_clients))
        if not 1 <= k <= num_clients:
            raise ValueError(f"sampling.clients_per_round must be in [1, {num_clients}], got {k}")
        return sorted(torch.randperm(num_clients, generator=g)[:k].tolist())
    if method == "poisson":
        if rate is None or not 0 < rate <= 1:
            raise ValueError(f"sampling.rate must be in (0, 1] for poisson sampling, got {rate}")
        coins = torch.rand(num_clients, generator=g, dtype=torch.float64)
        return torch.nonzero(coins < rate).flatten().tolist()
    raise ValueError(f"sampling.method must be 'fixed' or 'poisson', got {method!r}")


def straggler_steps(cid: int, round: int, seed: int, work, total: int) -> tuple[int, bool]:  # noqa: A002
    """How many of its ``total`` steps client ``cid`` runs this round, and whether it straggles
    (``work``: a ``runtime.base.LocalWork``; only its ``stragglers`` fraction is read)."""
    if work.stragglers > 0 and total > 1:
        gs = rng.generator(rng.key(seed, round, cid, "straggler"))
        coin, frac = torch.rand(2, generator=gs, dtype=torch.float64).tolist()
        if coin < work.stragglers:
            return 1 + int(frac * (total - 1)), True  # uniform in [1, total-1]
    return total, False
