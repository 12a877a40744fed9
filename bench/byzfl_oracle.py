"""atoll's robust aggregators against ByzFL's (EPFL) on random inputs, where the definitions agree.

    pip install --no-deps --target BYZFL_DIR byzfl==0.0.11   # bench only, never a dependency
    PYTHONPATH=src python bench/byzfl_oracle.py BYZFL_DIR [--trials 200]

ByzFL's package ``__init__`` imports its training framework (torchvision); this script loads only
``byzfl.aggregators`` (numpy and torch) under a bare package module, so ``--no-deps`` is enough.
For each rule: random float64 inputs (n in 7..15 rows, d in 1..200, a quarter of the rows
outliers up to 1e3 away), both rules on the same rows, the largest difference relative to the
output's norm. Where the definitions differ, the mapping is stated in ``PAIRS``:

* Krum: atoll scores with the n - f - 2 nearest others (Blanchard et al. 2017); ByzFL with
  n - f - 1, so atoll ``krum(f)`` is ByzFL ``Krum(f + 1)``, and ``multi_krum(f, m=n-f-1)`` is
  ``MultiKrum(f + 1)`` (ByzFL averages the n - f' best);
* geometric median: both smoothed Weiszfeld, from different starting points (ByzFL: zero,
  ``T`` steps; atoll: the mean, to convergence): compared with ByzFL at T = 2000;
* centered clipping: the first call (both start from zero), ``L`` = ``iters``;
* norm bound: ByzFL's ``Clipping(c)`` pre-aggregator then the mean = ``norm_bound(c, mean)``;
* NNM: ByzFL's ``NNM(f)`` then the mean = ``nnm(f, mean)``;
* ARC: ByzFL's ``ARC(f)`` then the mean = ``arc(f, mean)``.
Bucketing shuffles with its own generator, so its outputs are not comparable draw by draw.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

from atoll import aggregators as A


def load_byzfl(root: Path):
    pkg = types.ModuleType("byzfl")
    pkg.__path__ = [str(root / "byzfl")]  # the package without its __init__ (torchvision)
    sys.modules["byzfl"] = pkg
    return importlib.import_module("byzfl.aggregators")


def ours(rule, rows: np.ndarray) -> np.ndarray:
    x = {"w": torch.from_numpy(rows)}
    out, _ = rule.aggregate(x, torch.ones(len(rows), dtype=torch.float64), rule.init({"w": x["w"][0]}))
    return out["w"].numpy()


def pairs(B, n: int, f: int):
    """(name, atoll rule, ByzFL function of the rows) for one n and f."""
    def then_mean(pre):
        return lambda v: np.mean(pre(v), axis=0)
    return [
        ("median = Median", A.median(), B.Median()),
        ("trimmed_mean(f) = TrMean(f)", A.trimmed_mean(f), B.TrMean(f=f)),
        ("krum(f) = Krum(f + 1)", A.krum(f), B.Krum(f=f + 1)),
        ("multi_krum(f, m=n-f-1) = MultiKrum(f + 1)", A.multi_krum(f, m=n - f - 1),
         B.MultiKrum(f=f + 1)),
        ("geometric_median = GeometricMedian(T=2000)", A.geometric_median(iters=5000, nu=1e-8),
         B.GeometricMedian(nu=1e-8, T=2000)),
        ("centered_clipping(1, iters=3) = CenteredClipping(L=3)", A.centered_clipping(tau=1.0, iters=3),
         lambda v: B.CenteredClipping(L=3, tau=1.0)(v)),
        ("norm_bound(2, mean) = Clipping(2) + mean", A.norm_bound(2.0, A.mean("uniform")), then_mean(B.Clipping(c=2.0))),
        ("nnm(f, mean) = NNM(f) + mean", A.nnm(f, A.mean("uniform")), then_mean(B.NNM(f=f))),
        ("arc(f, mean) = ARC(f) + mean", A.arc(f, A.mean("uniform")), then_mean(B.ARC(f=f))),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("byzfl_dir", type=Path)
    ap.add_argument("--trials", type=int, default=200)
    a = ap.parse_args()
    B = load_byzfl(a.byzfl_dir)
    g = np.random.default_rng(0)
    worst: dict[str, float] = {}
    for _ in range(a.trials):
        n, d = int(g.integers(7, 16)), int(g.integers(1, 201))
        f = int(g.integers(1, (n - 3) // 2 + 1))  # krum(f) needs n >= 2f + 3
        rows = g.normal(size=(n, d))
        bad = g.choice(n, n // 4, replace=False)
        rows[bad] += g.normal(size=(len(bad), d)) * g.uniform(1, 1e3)
        for name, rule, theirs in pairs(B, n, f):
            want = np.asarray(theirs(rows.copy()), dtype=np.float64)
            got = ours(rule, rows)
            err = float(np.abs(got - want).max() / max(1.0, np.linalg.norm(want)))
            worst[name] = max(worst.get(name, 0.0), err)
    print(f"{a.trials} random trials (n 7..15, d 1..200, float64); largest |atoll - ByzFL| / max(1, |ByzFL|):")
    for name, err in worst.items():
        print(f"  {name:56} {err:.2e}  {'ok' if err <= 1e-6 else 'DIFFERS'}")


if __name__ == "__main__":
    main()
