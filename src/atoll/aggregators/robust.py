"""Byzantine-robust aggregation rules: each sees every client's update, none trusts a weight.

Every rule is ``aggregate(decoded (C, ...), weights (C,), state) -> (tree, state)`` over the
clients' updates flattened to a ``(C, D)`` matrix. A client's sample count is its own claim, so a
robust rule gives every client one vote: ``weights`` only marks who takes part (weight > 0).
Each rule checks that the cohort is large enough for its ``f`` and says so by name otherwise.

- ``median()``: coordinate-wise median (Yin et al. 2018).
- ``trimmed_mean(f)``: per coordinate, drop the f largest and f smallest, average the rest
  (Yin et al. 2018).
- ``krum(f)`` / ``multi_krum(f, m)``: score each update by the summed squared distance to its
  ``n - f - 2`` nearest others; keep the best one / average the best m (Blanchard et al. 2017).
- ``bulyan(f)``: ``n - 2f`` updates chosen by repeated Krum, then per coordinate the mean of the
  ``n - 4f`` values nearest the median (El Mhamdi et al. 2018).
- ``geometric_median(iters, nu)``: smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022).
"""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.aggregators.base import Aggregator
from atoll.tree import Tree


def matrix(decoded: Tree, weights: torch.Tensor) -> tuple[torch.Tensor, Tree]:
    """The participating clients' updates as rows of ``(C', D)``, and a template to unflatten."""
    keep = weights > 0
    rows = torch.cat([v.reshape(v.shape[0], -1) for v in decoded.values()], dim=1)  # (C, D)
    like = {k: v[0] for k, v in decoded.items()}
    return rows[keep], like


def batched(rows: torch.Tensor, like: Tree) -> Tree:
    """Rows ``(n, D)`` back to a batched tree ``(n, ...)`` shaped like ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        out[k] = rows[:, i:i + v.numel()].reshape(rows.shape[0], *v.shape)
        i += v.numel()
    return out


def need(name: str, n: int, least: int, rule: str) -> None:
    if n < least:
        raise ValueError(f"{name}: a cohort of {n} updates is too small ({rule} needs at least {least})")


def _rule(name: str, fn, needs_least=lambda n: 1, rule="", init=lambda params: ()) -> Aggregator:
    """An Aggregator from ``fn(rows (n, D), state) -> (vector (D,), state)``."""

    def aggregate(decoded: Tree, weights: torch.Tensor, state):
        rows, like = matrix(decoded, weights)
        need(name, rows.shape[0], needs_least(rows.shape[0]), rule)
        vec, state = fn(rows, state)
        return T.unflatten(vec, like), state

    return Aggregator(name, init=init, aggregate=aggregate, needs_individual=True,
                      weigh=lambda ids, samples: torch.ones_like(samples))


def left_out(n: int, kept) -> dict:
    """A rule's state naming the rows it did not use (``"excluded"``, see ``anomaly``)."""
    kept = set(int(i) for i in kept)
    return {"excluded": [i for i in range(n) if i not in kept]}


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median; the mean of the two middle values when n is even."""
    s, n = rows.sort(dim=0).values, rows.shape[0]
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def median() -> Aggregator:
    return _rule("median", lambda rows, st: (coordinate_median(rows), st))


def trimmed_mean(f: int) -> Aggregator:
    def fn(rows, st):
        n = rows.shape[0]
        return rows.sort(dim=0).values[f:n - f].mean(dim=0), st

    return _rule(f"trimmed_mean(f={f})", fn, lambda n: 2 * f + 1, "2f + 1")


def pairwise_sq_dists(rows: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` squared Euclidean distances, exact zeros on the diagonal."""
    d = torch.cdist(rows, rows).square()
    return d.fill_diagonal_(0.0)


def krum_scores(rows: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of squared distances from each update to its ``n - f - 2`` nearest other updates."""
    n = rows.shape[0]
    d = pairwise_sq_dists(rows)
    d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, :n - f - 2].sum(dim=1)


def krum(f: int) -> Aggregator:
    def fn(rows, st):
        best = int(krum_scores(rows, f).argmin())
        return rows[best], left_out(rows.shape[0], [best])

    return _rule(f"krum(f={f})", fn, lambda n: 2 * f + 3, "2f + 3")


def multi_krum(f: int, m: int | None = None) -> Aggregator:
    """The mean of the ``m`` best-scored updates (default ``m = n - f``)."""

    def fn(rows, st):
        k = m if m is not None else rows.shape[0] - f
        best = krum_scores(rows, f).argsort()[:k]
        return rows[best].mean(dim=0), left_out(rows.shape[0], best.tolist())

    return _rule(f"multi_krum(f={f})", fn, lambda n: max(2 * f + 3, m or 0), "2f + 3 and m")


def bulyan(f: int) -> Aggregator:
    def fn(rows, st):
        n = rows.shape[0]
        left, chosen = list(range(n)), []
        for _ in range(n - 2 * f):  # repeated Krum over what is left (f stays the same)
            sub = rows[left]
            scores = krum_scores(sub, f) if len(left) > f + 2 else torch.zeros(len(left))
            chosen.append(left.pop(int(scores.argmin())))
        sel = rows[chosen]  # (n - 2f, D)
        beta = sel.shape[0] - 2 * f
        med = coordinate_median(sel)
        nearest = (sel - med).abs().argsort(dim=0)[:beta]  # (beta, D)
        return sel.gather(0, nearest).mean(dim=0), left_out(n, chosen)

    return _rule(f"bulyan(f={f})", fn, lambda n: 4 * f + 3, "4f + 3")


def weiszfeld(rows: torch.Tensor, iters: int, nu: float, tol: float = 1e-10) -> torch.Tensor:
    """Smoothed Weiszfeld: ``z <- sum_i x_i / max(nu, |x_i - z|) / sum_i 1 / max(nu, |x_i - z|)``."""
    z = rows.mean(dim=0)
    for _ in range(iters):
        beta = 1.0 / (rows - z).norm(dim=1).clamp_min(nu)  # (n,)
        new = (beta[:, None] * rows).sum(dim=0) / beta.sum()
        done = bool((new - z).norm() <= tol * max(1.0, float(z.norm())))
        z = new
        if done:
            break
    return z


def geometric_median(iters: int = 100, nu: float = 1e-6) -> Aggregator:
    return _rule("geometric_median", lambda rows, st: (weiszfeld(rows, iters, nu), st))
