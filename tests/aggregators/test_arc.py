"""ARC (adaptive robust clipping) against a slow loop oracle written from the paper's definition,
its composition from the config and the errors for bad keys. The comparison with ByzFL's ``ARC``
(a bench-only dependency) is in bench/byzfl_oracle.py (docs/robustness.md)."""

import numpy as np
import pytest
import torch

from atoll import aggregators as A
from atoll import config
from atoll import tree as T


def oracle_arc(x, f):
    """Sort by norm (a loop), clip the k = floor(2 f (n - f) / n) largest to the (k+1)-th's norm."""
    n = len(x)
    k = int(np.floor(2 * (f / n) * (n - f) + 1e-9))  # exact for these small n
    norms = [float(np.sqrt(sum(v * v for v in row))) for row in x]
    order = sorted(range(n), key=lambda i: -norms[i])
    bound = norms[order[k]]
    out = []
    for i, row in enumerate(x):
        out.append(row * (bound / norms[i]) if i in order[:k] and norms[i] > bound else row.copy())
    return np.array(out)


def oracle_median(x):
    return np.array([np.median(col) for col in x.T])


def oracle_trimmed(x, f):
    return np.array([np.mean(sorted(col)[f:len(col) - f]) for col in x.T])


def run(agg, x, weights=None):
    tree = {"a": torch.tensor(x[:, :3]), "b": torch.tensor(x[:, 3:]).reshape(len(x), -1, 1)}
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else weights
    out, st = agg.aggregate(tree, w, agg.init({k: v[0] for k, v in tree.items()}))
    return T.flatten(out).numpy(), st


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * max(1.0, float(np.abs(b).max())))


def cohort(n, d=7, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d))
    x[g.choice(n, n // 4, replace=False)] *= g.uniform(5, 1e3)  # a few large ones
    return x


@pytest.mark.parametrize("n, f", [(12, 2), (13, 3), (14, 4), (10, 1), (9, 4), (7, 0), (11, 5)])
def test_arc_equals_its_loop_oracle(n, f):
    x = cohort(n, seed=n + f)
    clipped = oracle_arc(x, f)
    close(run(A.arc(f, A.mean("uniform")), x)[0], clipped.mean(axis=0))
    close(run(A.arc(f, A.median()), x)[0], oracle_median(clipped))
    if n >= 2 * f + 1:
        close(run(A.arc(f, A.trimmed_mean(f)), x)[0], oracle_trimmed(clipped, f))
    k = 2 * f * (n - f) // n
    norms = np.linalg.norm(clipped, axis=1)
    bound = np.sort(np.linalg.norm(x, axis=1))[::-1][k]
    assert np.sum(np.isclose(norms, bound, rtol=1e-12)) >= k + 1  # k clipped onto the (k+1)-th
    assert norms.max() == pytest.approx(bound, rel=1e-12)


def test_arc_clips_k_and_leaves_the_rest_exactly():
    x = cohort(12, seed=1)
    x[[3, 7]] *= 1e4  # two boosted updates; k = floor(2 * 2/12 * 10) = 3
    assert A.mixing.arc_clipped(2, 12) == 3
    out, _ = run(A.arc(2, A.mean("uniform")), x)
    norms = np.linalg.norm(x, axis=1)
    top = np.argsort(-norms)[:3]
    kept = np.delete(x, top, axis=0)
    scaled = x[top] * (np.sort(norms)[::-1][3] / norms[top])[:, None]
    close(out, np.concatenate([kept, scaled]).mean(axis=0))  # the other 9 rows pass untouched


def test_arc_is_permutation_invariant_ignores_sizes_and_composes():
    x = cohort(11, seed=2)
    agg = A.arc(2, A.nnm(2, A.trimmed_mean(2)))
    assert agg.name == "arc(f=2)(nnm(f=2)(trimmed_mean(f=2)))" and agg.needs_individual
    base, _ = run(agg, x)
    perm = np.random.default_rng(0).permutation(11)
    close(run(agg, x[perm])[0], base)
    assert agg.weights(list(range(11)), torch.arange(1.0, 12.0)).tolist() == [1.0] * 11
    w = torch.tensor([1.0] * 5 + [0.0] + [1.0] * 5, dtype=torch.float64)  # client 5 does not take part
    close(run(A.arc(2, A.mean("uniform")), x, weights=w)[0],
          oracle_arc(np.delete(x, 5, axis=0), 2).mean(axis=0))


def test_arc_bad_arguments_and_small_cohorts_are_named():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="arc: f must be an integer >= 0"):
            A.arc(bad, A.mean())
    with pytest.raises(ValueError, match=r"arc: a cohort of 3 updates is too small \(f \+ 1"):
        run(A.arc(3, A.mean()), cohort(3))


def test_arc_from_the_config_and_its_errors():
    build = lambda text: config.build_aggregator(config.load(text="[aggregator]\n" + text))  # noqa: E731
    assert build("name = 'centered_clipping'\ntau = 0.3\niters = 3\narc = true\nf = 2\n").name == \
        "arc(f=2)(centered_clipping(tau=0.3))"
    assert build("name = 'trimmed_mean'\nnnm = true\narc = true\nf = 2\n").name == \
        "arc(f=2)(nnm(f=2)(trimmed_mean(f=2)))"
    assert build("name = 'median'\nbucket = 2\narc = true\nf = 1\n").name == \
        "arc(f=1)(bucketing(s=2)(median))"
    assert build("name = 'mean'\narc = true\nf = 1\n").name == "arc(f=1)(mean)"
    assert build("name = 'median'\narc = true\n").name == "arc(f=0)(median)"  # k = 0: clips nothing
    with pytest.raises(config.ConfigError, match=r"aggregator.arc = true with aggregator.f = 10.*more than f"):
        build("name = 'median'\narc = true\nf = 10\n")
    with pytest.raises(config.ConfigError, match="cannot run after aggregator.nnm, aggregator.bucket "
                                                  "or aggregator.arc"):
        build("name = 'flame'\narc = true\nf = 1\n")
    with pytest.raises(config.ConfigError, match="aggregator.arc"):
        config.load(text="[aggregator]\narc = 'often'\n")
    with pytest.raises(config.ConfigError, match="aggregator.arcc"):
        config.load(text="[aggregator]\narcc = true\n")


def test_arc_is_refused_under_secure_aggregation():
    cfg = config.load(text="[aggregator]\nname = 'median'\nbucket = 2\narc = true\nf = 1\n[secure]\n"
                           "method = 'secagg'\n")
    with pytest.raises(config.ConfigError, match="with arc needs each client's update"):
        config.build(cfg)
