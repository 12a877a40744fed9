"""Robust rules that reshape the cohort before (or instead of) a robust centre.

- ``centered_clipping(tau, iters)``: ``v <- v + mean_i clip_tau(x_i - v)`` from the previous
  round's aggregate (Karimireddy, He & Jaggi, ICML 2021). ``tau = "median"``: each iteration's
  radius is the median of the rows' distances from ``v``, so it follows the honest spread as the
  updates shrink over training and as averaging (secure buckets) narrows it; it needs no scale,
  and with fewer than half the rows bad the median distance is bounded by an honest row's.
  ``shrink`` (``tau = "median"`` only) multiplies that radius: over secure buckets of ``s`` the
  config passes ``1/sqrt(s)``. A bucket with one attacker may be cut only to the radius and holds a
  whole attacker, so with the median radius each attacker kept about twice its plaintext share of
  the clipped weight (docs/robustness.md, "dir0.1, f = 2, seed 5"); a bucket mean of independent
  honest rows spreads ``1/sqrt(s)`` of a row, and ``median / sqrt(s)`` brings a half-bad bucket's
  budget, per attacker, back to about a plaintext row's.
- ``norm_bound(c, inner)``: scale every update to L2 norm at most ``c``, then ``inner``
  (Sun et al. 2019, "Can you really backdoor federated learning?"); ``c = "median"`` bounds each
  round by the median norm of that round's updates (FLAME's clipping bound, Nguyen et al. 2022).
- ``bucketing(s, inner)``: shuffle, average buckets of ``s`` updates, run ``inner`` on the bucket
  means (Karimireddy, He & Jaggi, ICLR 2022). The shuffle is drawn from the aggregator's own
  state (seed, round count), so a run is reproducible and resumes exactly.
- ``nnm(f, inner)``: replace every update by the mean of its ``n - f`` nearest updates (itself
  included), then ``inner`` (Allouah et al., AISTATS 2023).
- ``arc(f, inner)``: adaptive robust clipping: the ``k = floor(2 (f/n) (n - f))`` largest-norm
  updates are scaled down to the norm of the ``(k + 1)``-th largest, then ``inner`` (Allouah et
  al. 2024, arXiv:2405.14432, "Boosting robustness by clipping gradients in distributed
  learning"; ByzFL's ``ARC`` cites it as "The vital role of gradient clipping in
  Byzantine-resilient distributed learning").
"""
from __future__ import annotations

import torch

from atoll import rng
from atoll import tree as T
from atoll.aggregators.base import Aggregator, mean
from atoll.aggregators.robust import batched, coordinate_median, matrix, need, pairwise_sq_dists
from atoll.tree import Tree


def _uniform(ids, samples):
    return torch.ones_like(samples)


def centered_clipping(tau: float | str = 10.0, iters: int = 1, shrink: float = 1.0) -> Aggregator:
    if tau != "median" and not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"centered_clipping: tau must be > 0 or 'median', got {tau!r}")
    if not (isinstance(shrink, (int, float)) and 0 < shrink <= 1) or (shrink != 1 and tau != "median"):
        raise ValueError(f"centered_clipping: shrink must be in (0, 1], and only with tau = 'median', "
                         f"got shrink = {shrink!r} with tau = {tau!r}")

    def aggregate(decoded: Tree, weights: torch.Tensor, state):
        rows, like = matrix(decoded, weights)
        need("centered_clipping", rows.shape[0], 1, "one update")
        v = state["centre"].to(rows.dtype)
        for _ in range(iters):
            diff = rows - v
            dist = diff.norm(dim=1)
            radius = coordinate_median(dist[:, None])[0] * shrink if tau == "median" else tau
            scale = (radius / dist.clamp_min(1e-30)).clamp(max=1.0)  # (n,)
            v = v + (scale[:, None] * diff).mean(dim=0)
        return T.unflatten(v, like), {"centre": v}

    name = f"centered_clipping(tau={tau})" if shrink == 1 else f"centered_clipping(tau=median*{shrink:.4g})"
    return Aggregator(name, aggregate=aggregate, needs_individual=True,
                      init=lambda params: {"centre": T.flatten(T.zeros_like(params))},
                      weigh=_uniform)


def _wrapped(name: str, inner: Aggregator, transform, init=None, rowwise=True) -> Aggregator:
    """``inner`` after ``transform(rows, weights, state) -> (rows, weights, state)``;
    ``rowwise``: row i of the transform's output is client i's (the inner rule's exclusions
    are then the clients'; bucketing's rows are buckets)."""

    def aggregate(decoded: Tree, weights: torch.Tensor, state):
        rows, like = matrix(decoded, weights)
        keep = weights[weights > 0]
        need(name, rows.shape[0], 1, "one update")
        rows, keep, own = transform(rows, keep, state["own"])
        out, inner_state = inner.aggregate(batched(rows, like), keep, state["inner"])
        gone = inner_state.get("excluded") if rowwise and isinstance(inner_state, dict) else None
        return out, {"own": own, "inner": inner_state, **({"excluded": gone} if gone else {})}

    return Aggregator(f"{name}({inner.name})", needs_individual=True, weigh=inner.weigh,
                      aggregate=aggregate,
                      init=lambda params: {"own": init() if init else (), "inner": inner.init(params)})


def norm_bound(c: float | str, inner: Aggregator | None = None) -> Aggregator:
    if c != "median" and not (isinstance(c, (int, float)) and c > 0):
        raise ValueError(f"norm_bound: c must be > 0 or 'median', got {c!r}")

    def transform(rows, weights, own):
        norms = rows.norm(dim=1)
        bound = coordinate_median(norms[:, None])[0] if c == "median" else c
        scale = (bound / norms.clamp_min(1e-30)).clamp(max=1.0)
        return rows * scale[:, None], weights, own

    return _wrapped(f"norm_bound(c={c})", inner or mean(), transform)


def nnm(f: int, inner: Aggregator) -> Aggregator:
    def transform(rows, weights, own):
        n = rows.shape[0]
        need("nnm", n, f + 1, "f + 1")
        nearest = pairwise_sq_dists(rows).argsort(dim=1, stable=True)[:, :n - f]  # (n, n - f), self first
        return rows[nearest].mean(dim=1), weights, own

    return _wrapped(f"nnm(f={f})", inner, transform)


def arc_clipped(f: int, n: int) -> int:
    """ARC's ``k``: how many of ``n`` updates it clips, ``floor(2 (f/n) (n - f))`` (exact in
    integers)."""
    return 2 * f * (n - f) // n


def arc(f: int, inner: Aggregator) -> Aggregator:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"arc: f must be an integer >= 0, got {f!r}")

    def transform(rows, weights, own):
        n = rows.shape[0]
        need("arc", n, f + 1, "f + 1")
        norms = rows.norm(dim=1)
        bound = norms.sort(descending=True).values[arc_clipped(f, n)]  # the (k + 1)-th largest
        scale = (bound / norms.clamp_min(1e-30)).clamp(max=1.0)  # 1 for all but the k largest
        return rows * scale[:, None], weights, own

    return _wrapped(f"arc(f={f})", inner, transform)


def bucketing(s: int, inner: Aggregator, seed: int = 0) -> Aggregator:
    if s < 1:
        raise ValueError(f"bucketing: bucket size s must be >= 1, got {s}")

    def transform(rows, weights, count):
        n = rows.shape[0]
        order = torch.randperm(n, generator=rng.generator(rng.fold(seed, int(count))))
        means = torch.stack([rows[order[i:i + s]].mean(dim=0) for i in range(0, n, s)])
        return means, torch.ones(means.shape[0], dtype=weights.dtype), count + 1

    agg = _wrapped(f"bucketing(s={s})", inner, transform, init=lambda: 0, rowwise=False)
    return Aggregator(agg.name, agg.init, agg.aggregate, needs_individual=True, weigh=_uniform)
