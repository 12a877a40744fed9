"""Splitting sample indices across clients.

Every function returns ``list[np.ndarray]``: one sorted int64 index array per client. The arrays
are disjoint and together cover ``range(n)`` (``n = len(y)``). All randomness comes from the
``np.random.Generator`` argument, which callers derive from a counter-based key, e.g.
``np.random.default_rng(rng.key(seed, 0, rng.SERVER, "partition"))``, so a partition is a pure
function of its inputs and the seed.
"""
from __future__ import annotations

import numpy as np

METHODS = ("iid", "dirichlet", "shards", "quantity", "column")


def iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniformly random split into near-equal shares (sizes differ by at most one)."""
    _check_clients(n, num_clients)
    sizes = np.full(num_clients, n // num_clients) + (np.arange(num_clients) < n % num_clients)
    return _deal(rng.permutation(n), sizes)


def dirichlet(y, num_clients: int, alpha: float, rng: np.random.Generator,
              min_size: int = 1, max_draws: int = 100) -> list[np.ndarray]:
    """Label-Dirichlet skew (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification").

    For each class, shares over the clients are drawn from Dir(α·1) and the class's (shuffled)
    samples are cut at those proportions; small α gives clients few dominant labels. The whole
    draw is repeated (at most ``max_draws`` times) until every client has ``min_size`` samples,
    as in the usual implementation (Li et al. 2022, NIID-Bench); if no draw succeeds, single
    random samples move from the largest client to the smallest until all have ``min_size``.
    """
    y = _labels(y)
    n = len(y)
    _check_clients(n, num_clients)
    if not alpha > 0:
        raise ValueError(f"data.alpha (Dirichlet concentration) must be > 0, got {alpha}")
    if min_size * num_clients > n:
        raise ValueError(f"cannot give {num_clients} clients {min_size} samples each from {n}")
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    for _ in range(max_draws):
        owner = np.empty(n, dtype=np.int64)
        for idx in by_class:
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx)).astype(int)
            owner[idx] = np.repeat(np.arange(num_clients), np.diff([0, *cuts, len(idx)]))
        if np.bincount(owner, minlength=num_clients).min() >= min_size:
            break
    else:
        owner = _top_up(owner, num_clients, min_size, rng)
    return _groups_of(owner, num_clients)


def shards(y, num_clients: int, shards_per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological label skew of McMahan et al. 2017 ("Communication-Efficient Learning of Deep
    Networks from Decentralized Data"): sort by label, cut into ``num_clients * k`` shards, give
    each client ``k`` random shards.

    Shards here never straddle two labels, so a client holds at most ``k`` labels: each class is
    cut into a number of shards proportional to its size (at least one), which keeps shard sizes
    near ``n / (num_clients * k)``. Needs ``num_clients * k`` >= the number of classes.
    """
    y = _labels(y)
    n, k = len(y), shards_per_client
    _check_clients(n, num_clients)
    classes, counts = np.unique(y, return_counts=True)
    total = num_clients * k
    if k < 1 or total > n or total < len(classes):
        raise ValueError(f"data.shards_per_client = {k} with {num_clients} clients makes {total} "
                         f"shards; need between {len(classes)} (one per class) and {n} (samples)")
    per_class = _apportion(counts.astype(float), total, cap=counts)
    shard_list = []
    for c, m in zip(classes, per_class):
        shard_list += np.array_split(rng.permutation(np.flatnonzero(y == c)), m)
    order = rng.permutation(total)
    return [np.sort(np.concatenate([shard_list[s] for s in order[i * k:(i + 1) * k]]))
            for i in range(num_clients)]


def quantity_skew(n: int, num_clients: int, rng: np.random.Generator,
                  sigma: float = 1.0) -> list[np.ndarray]:
    """Quantity skew: client sizes proportional to log-normal(0, σ) weights, each >= 1; the
    samples themselves are assigned uniformly at random (labels stay IID)."""
    _check_clients(n, num_clients)
    if not sigma > 0:
        raise ValueError(f"data.sigma (log-normal spread of client sizes) must be > 0, got {sigma}")
    sizes = _apportion(rng.lognormal(0.0, sigma, num_clients), n)
    return _deal(rng.permutation(n), sizes)


def by_group(groups) -> list[np.ndarray]:
    """One client per distinct group value, in sorted order of the values."""
    values, inverse = np.unique(_labels(groups), return_inverse=True)
    return _groups_of(inverse.reshape(-1), len(values))


def partition(y, num_clients: int | None, method: str, rng: np.random.Generator, *,
              alpha: float = 0.5, shards_per_client: int = 2, sigma: float = 1.0,
              groups=None) -> list[np.ndarray]:
    """Dispatch to one of ``METHODS``; "column" uses ``groups`` and ignores the generator."""
    y = _labels(y)
    if method == "column":
        if groups is None:
            raise ValueError("partition 'column' needs a silo id per sample: set data.group_column "
                             "to the column naming each sample's silo (or use data set 'synthetic')")
        if len(_labels(groups)) != len(y):
            raise ValueError(f"groups has {len(_labels(groups))} entries, labels {len(y)}")
        parts = by_group(groups)
        if num_clients not in (None, 0, len(parts)):
            raise ValueError(f"partition 'column' gives one client per group and the data has "
                             f"{len(parts)} groups; set data.num_clients = {len(parts)} (or 0), "
                             f"not {num_clients}")
        return parts
    if method == "iid":
        return iid(len(y), num_clients, rng)
    if method == "dirichlet":
        return dirichlet(y, num_clients, alpha, rng)
    if method == "shards":
        return shards(y, num_clients, shards_per_client, rng)
    if method == "quantity":
        return quantity_skew(len(y), num_clients, rng, sigma)
    raise ValueError(f"unknown data.partition {method!r}; choose one of {', '.join(METHODS)}")


# --- helpers ------------------------------------------------------------------------------

def _labels(y) -> np.ndarray:
    return np.asarray(y).reshape(-1)


def _check_clients(n: int, num_clients) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"data.num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"data.num_clients = {num_clients} exceeds the {n} samples to partition; "
                         "every client needs at least one sample")


def _deal(perm: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of ``perm`` of the given sizes, each sorted."""
    return [np.sort(p).astype(np.int64) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def _groups_of(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Indices owned by each client (a stable sort keeps each list ascending)."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1])


def _apportion(weights: np.ndarray, total: int, cap: np.ndarray | None = None) -> np.ndarray:
    """Integers >= 1 (and <= cap) summing to ``total``, proportional to ``weights`` beyond the
    first unit each (largest-remainder rounding). Assumes len(weights) <= total <= sum(cap)."""
    q = (total - len(weights)) * weights / weights.sum()
    out = 1 + np.floor(q).astype(np.int64)
    out[np.argsort(np.floor(q) - q, kind="stable")[:total - out.sum()]] += 1
    if cap is not None:
        while (out > cap).any():  # rare: hand the excess to classes with room, largest first
            i, j = np.argmax(out - cap), np.argmax(np.where(out < cap, weights, -np.inf))
            out[i] -= 1
            out[j] += 1
    return out


def _top_up(owner: np.ndarray, num_clients: int, min_size: int,
            rng: np.random.Generator) -> np.ndarray:
    """Move random samples from the largest client to the smallest until all have ``min_size``."""
    owner = owner.copy()
    counts = np.bincount(owner, minlength=num_clients)
    while counts.min() < min_size:
        small, big = np.argmin(counts), np.argmax(counts)
        owner[rng.choice(np.flatnonzero(owner == big))] = small
        counts[small] += 1
        counts[big] -= 1
    return owner
