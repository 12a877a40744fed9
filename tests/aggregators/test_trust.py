"""FLTrust and FLAME against slow loop-based oracles written from the papers (Cao et al. 2021,
Algorithm 1; Nguyen et al. 2022, Algorithm 1), and the attacks each is built to stop."""
import math

import numpy as np
import pytest
import torch
from sklearn.cluster import HDBSCAN

from atoll import aggregators as A
from atoll import rng
from atoll import tree as T


def as_tree(x):
    return {"a": torch.tensor(x[:, :3]), "b": torch.tensor(x[:, 3:]).reshape(len(x), -1, 1)}


def run(agg, x, state=None, weights=None, params=None, key=0):
    tree = as_tree(x)
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else weights
    st = agg.init({k: v[0] for k, v in tree.items()}) if state is None else state
    if agg.prepare is not None:
        st = agg.prepare(st, params, key)
    out, st = agg.aggregate(tree, w, st)
    return T.flatten(out).numpy(), st


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * max(1.0, float(np.abs(b).max())))


def norm(v):
    return math.sqrt(sum(float(t) ** 2 for t in v))


def oracle_fltrust(x, g0):
    num, total = np.zeros(len(g0)), 0.0
    for g in x:
        cos = sum(float(a) * float(b) for a, b in zip(g, g0)) / (norm(g) * norm(g0))
        ts = max(cos, 0.0)
        total += ts
        num += ts * (norm(g0) / norm(g)) * g
    return num / total if total > 0 else np.zeros(len(g0))


def oracle_flame(x):
    """Without noise: HDBSCAN on loop-computed cosine distances, clip to the median norm, mean."""
    n = len(x)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                dist[i, j] = 1.0 - sum(x[i] * x[j]) / (norm(x[i]) * norm(x[j]))
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit(np.clip(dist, 0, 2)).labels_
    kept = [i for i in range(n) if labels[i] >= 0] or list(range(n))
    e = sorted(norm(v) for v in x)
    s = e[n // 2] if n % 2 else (e[n // 2 - 1] + e[n // 2]) / 2
    return sum(x[i] * min(1.0, s / norm(x[i])) for i in kept) / len(kept), kept


def fixed(g0):
    one = {k: v[0] for k, v in as_tree(g0[None]).items()}
    return A.fltrust(lambda params, key: one)


@pytest.mark.parametrize("n", [6, 11])
def test_fltrust_equals_its_oracle(n):
    for seed in range(5):
        g = np.random.default_rng(seed)
        x, g0 = g.normal(size=(n, 7)) * 10.0 ** seed, g.normal(size=7)
        close(run(fixed(g0), x)[0], oracle_fltrust(x, g0))


def test_fltrust_gives_a_sign_flipped_client_zero_weight():
    g = np.random.default_rng(1)
    g0 = g.normal(size=7)
    x = g0 + 0.3 * g.normal(size=(8, 7))
    x[3] = -50.0 * x[3]  # sign flipped and boosted
    out, st = run(fixed(g0), x)
    assert st["excluded"] == [3] and st["trust"][3] == 0.0
    close(out, oracle_fltrust(np.delete(x, 3, axis=0), g0))
    assert np.linalg.norm(out) <= np.linalg.norm(g0) * (1 + 1e-12)  # rescaled to |g0| at most


def test_fltrust_without_a_trusted_client_returns_zero_and_without_prepare_refuses():
    g0 = np.ones(7)
    out, st = run(fixed(g0), -np.abs(np.random.default_rng(0).normal(size=(4, 7))))
    assert not out.any() and st["excluded"] == [0, 1, 2, 3]
    agg = fixed(g0)
    with pytest.raises(ValueError, match="fltrust: no server update"):
        agg.aggregate(as_tree(np.ones((3, 7))), torch.ones(3, dtype=torch.float64), agg.init({}))


def test_fltrust_prepare_receives_the_global_model_and_key():
    seen = []
    agg = A.fltrust(lambda params, key: seen.append((params, key)) or {"a": torch.ones(3),
                                                                         "b": torch.ones(4, 1)})
    run(agg, np.ones((3, 7)), params={"w": 1}, key=42)
    assert seen == [({"w": 1}, 42)]


def outlier_cohort(seed, honest=8, bad=3, d=20):
    """Honest updates around one direction, a colluding backdoor-like cluster around another
    (nearly orthogonal), boosted 20x."""
    g = np.random.default_rng(seed)
    u, v = g.normal(size=d), g.normal(size=d)
    v -= v @ u / (u @ u) * u
    x = np.vstack([u + 0.2 * np.linalg.norm(u) / math.sqrt(d) * g.normal(size=(honest, d)),
                   20 * (v + 0.05 * np.linalg.norm(v) / math.sqrt(d) * g.normal(size=(bad, d)))])
    return x


@pytest.mark.parametrize("n", [7, 10, 11])
def test_flame_without_noise_equals_its_oracle(n):
    for seed in range(5):
        x = np.random.default_rng(seed).normal(size=(n, 7)) * 10.0 ** seed
        out, st = run(A.flame(lam=0.0), x)
        want, kept = oracle_flame(x)
        close(out, want)
        assert st["excluded"] == sorted(set(range(n)) - set(kept))
    x = outlier_cohort(0)
    close(run(A.flame(lam=0.0), x)[0], oracle_flame(x)[0])


def test_flame_excludes_a_backdoor_like_cluster_and_clips_to_the_median_norm():
    for seed in range(5):
        x = outlier_cohort(seed)
        out, st = run(A.flame(lam=0.0), x)
        kept = sorted(set(range(11)) - set(st["excluded"]))
        assert {8, 9, 10} <= set(st["excluded"]) and len(kept) >= 6, (seed, st)  # majority kept
        norms = np.linalg.norm(x, axis=1)
        clipped = [v * min(1.0, np.median(norms) / np.linalg.norm(v)) for v in x[kept]]
        close(out, np.mean(clipped, axis=0))


def test_flame_noise_has_std_lam_times_median_norm_and_is_seeded():
    g = np.random.default_rng(0)
    x = g.normal(size=(9, 40_000))
    agg = A.flame(lam=0.01, seed=7)
    clean, _ = run(A.flame(lam=0.0), x)
    a, st = run(agg, x)
    s = np.median(np.linalg.norm(x, axis=1))
    std = np.std(a - clean)
    assert abs(std / (0.01 * s) - 1) < 0.03, (std, 0.01 * s)
    assert st["count"] == 1
    close(run(agg, x)[0], a)  # same seed and round count: the same noise
    b, _ = run(agg, x, state=st)  # next round: fresh noise
    assert np.abs(b - a).max() > 1e-3 * 0.01 * s
    c, _ = run(A.flame(lam=0.01, seed=8), x)
    assert np.abs(c - a).max() > 1e-3 * 0.01 * s
    gen = rng.generator(rng.fold(rng.fold(7, "flame"), 0))
    close(a - clean, 0.01 * s * torch.randn(x.shape[1], generator=gen, dtype=torch.float64).numpy())


@pytest.mark.parametrize("make", [lambda: fixed(np.arange(7.0) - 3), lambda: A.flame(lam=0.0)])
def test_trust_rules_are_permutation_invariant(make):
    x = outlier_cohort(2, honest=6, bad=3, d=7)
    perm = np.random.default_rng(5).permutation(len(x))
    a, sa = run(make(), x)
    b, sb = run(make(), x[perm])
    close(b, a)
    assert sorted(perm[sb["excluded"]].tolist()) == sa["excluded"]


def test_trust_rules_give_one_vote_and_skip_zero_weight_rows():
    x = outlier_cohort(3)
    w = torch.ones(len(x), dtype=torch.float64)
    w[0] = 0.0
    for make in (lambda: fixed(np.ones(20)), lambda: A.flame(lam=0.0)):
        agg = make()
        assert torch.equal(agg.weights([0, 1], torch.tensor([5.0, 900.0])), torch.ones(2))
        close(run(agg, x, weights=w)[0], run(make(), x[1:])[0])
