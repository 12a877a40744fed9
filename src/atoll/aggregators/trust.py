"""Rules that decide whom to trust before averaging: FLTrust and FLAME.

- ``fltrust(server_update)`` (Cao, Fang, Liu & Gong, NDSS 2021): the server trains its own
  update ``g0`` on a small clean root data set each round (``server_update(params, key)``,
  called through ``Aggregator.prepare``); client i gets trust ``TS_i = ReLU(cos(g_i, g0))``,
  its update is rescaled to ``|g0|``, and the output is ``sum_i TS_i |g0|/|g_i| g_i / sum_i TS_i``
  (Algorithm 1). A cohort with no trusted client gives a zero update.
- ``flame(lam, seed)`` (Nguyen et al., USENIX Security 2022, Algorithm 1): HDBSCAN over the
  pairwise cosine distances of the updates (min cluster size n/2 + 1, min samples 1, one
  cluster allowed) keeps the majority cluster; every kept update is clipped to the median L2
  norm ``S`` of all updates, the kept ones are averaged and Gaussian noise of std ``lam * S`` is
  added (``lam = 0.001`` for image classification in the paper). The paper clusters the local
  models; an aggregator sees updates ``W_i - G``, so the cosines are taken between updates
  (the global model's common offset would make every model's cosine close to 1). The noise is
  drawn from ``(seed, round count)`` held in the rule's state, as ``bucketing`` does.

Both report the rows they left out under ``"excluded"`` in their state (``anomaly``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from atoll import rng
from atoll import tree as T
from atoll.aggregators.base import Aggregator
from atoll.aggregators.robust import coordinate_median, matrix, need
from atoll.tree import Tree


def _uniform(ids, samples):
    return torch.ones_like(samples)


def trust_scores(rows: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    """``ReLU(cos(g_i, g0))`` for every row (0 for a zero row or a zero ``g0``)."""
    dots = rows @ g0
    norms = rows.norm(dim=1) * g0.norm()
    return torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.zeros_like(dots)).clamp_min(0.0)


def fltrust(server_update: Callable[[Tree, int], Tree]) -> Aggregator:
    """FLTrust; ``server_update(params, key) -> delta`` trains on the root data from ``params``."""

    def prepare(state, params, key):
        return {"g0": T.flatten(server_update(params, key))}

    def aggregate(decoded: Tree, weights: torch.Tensor, state):
        if not isinstance(state, dict) or "g0" not in state:
            raise ValueError("fltrust: no server update this round (the server step must call "
                             "Aggregator.prepare with the global model first)")
        rows, like = matrix(decoded, weights)
        need("fltrust", rows.shape[0], 1, "one update")
        g0 = state["g0"].to(rows.dtype)
        ts = trust_scores(rows, g0)
        scaled = rows * (g0.norm() / rows.norm(dim=1).clamp_min(1e-300))[:, None]
        total = ts.sum()
        out = (ts[:, None] * scaled).sum(dim=0) / total if total > 0 else torch.zeros_like(g0)
        excluded = [i for i in range(rows.shape[0]) if not ts[i] > 0]
        return T.unflatten(out, like), {"excluded": excluded, "trust": ts.tolist()}

    return Aggregator("fltrust", init=lambda params: {}, aggregate=aggregate, needs_individual=True,
                      weigh=_uniform, prepare=prepare)


def cosine_distances(rows: torch.Tensor) -> np.ndarray:
    """``(n, n)`` float64 ``1 - cos(x_i, x_j)``, clipped to [0, 2], zero diagonal."""
    x = rows.to(torch.float64)
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    d = (1.0 - unit @ unit.T).clamp(0.0, 2.0)
    return d.fill_diagonal_(0.0).numpy()


def majority_cluster(rows: torch.Tensor) -> list[int]:
    """FLAME's filter: the rows HDBSCAN puts in a cluster (min size n/2 + 1: at most one);
    every row when HDBSCAN finds none (too few updates to tell)."""
    from sklearn.cluster import HDBSCAN

    n = rows.shape[0]
    if n < 3:
        return list(range(n))
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed", copy=True,
                     allow_single_cluster=True).fit(cosine_distances(rows)).labels_
    kept = [i for i in range(n) if labels[i] >= 0]
    if not kept:
        return list(range(n))
    biggest = np.bincount(labels[labels >= 0]).argmax()
    return [i for i in range(n) if labels[i] == biggest]


def flame(lam: float = 0.001, seed: int = 0) -> Aggregator:
    if lam < 0:
        raise ValueError(f"flame: lam must be >= 0, got {lam}")

    def aggregate(decoded: Tree, weights: torch.Tensor, state):
        rows, like = matrix(decoded, weights)
        need("flame", rows.shape[0], 1, "one update")
        count = state["count"]
        kept = majority_cluster(rows)
        norms = rows.norm(dim=1)
        s = coordinate_median(norms[:, None])[0]  # the median norm (mean of the middle two)
        clip = (s / norms[kept].clamp_min(1e-300)).clamp(max=1.0)
        out = (rows[kept] * clip[:, None]).mean(dim=0)
        if lam > 0:
            g = rng.generator(rng.fold(rng.fold(seed, "flame"), count))
            out = out + lam * s * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        excluded = sorted(set(range(rows.shape[0])) - set(kept))
        return T.unflatten(out, like), {"count": count + 1, "excluded": excluded}

    return Aggregator(f"flame(lam={lam})", init=lambda params: {"count": 0}, aggregate=aggregate,
                      needs_individual=True, weigh=_uniform)
