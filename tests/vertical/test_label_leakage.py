"""Label leakage in split learning (``atoll.vertical.leakage``): the AUC equals a pairwise oracle;
the norm and cosine attacks on the passive party's received gradients recover the labels of an
imbalanced task; Gaussian noise on the cut-layer gradients brings both attacks to chance."""
import itertools

import pytest
import torch

from atoll.vertical import leakage as L


def test_attack_auc_equals_the_pairwise_oracle_with_ties():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(60, 1, generator=g) < 0.2).double()
    scores = torch.randint(0, 5, (60,), generator=g).double()  # many ties
    rows = torch.arange(60)
    pos = [s for s, y in zip(scores, labels[:, 0]) if y == 1]
    neg = [s for s, y in zip(scores, labels[:, 0]) if y == 0]
    oracle = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert L.attack_auc(rows, scores, labels) == pytest.approx(oracle / (len(pos) * len(neg)), abs=1e-12)


def test_cosine_attack_is_exact_with_a_linear_top_model():
    """g_i = (p_i - y_i) / B * w_top: every gradient is parallel to w_top, the sign is the label."""
    r = L.experiment(0.0, n=600, epochs=1, linear_top=True)
    assert r["cosine_auc"] == 1.0


def test_scores_use_only_what_the_passive_party_received():
    xp, xl, y = L.imbalanced_task(256, 1)
    net = L._build(xp, xl, y, 0.0, 1, 0.1)
    plan = L.batches(256, 64, 1, 1)
    net.fit(plan)
    rec = net.parties[0].received
    assert [torch.equal(r, p) for (r, _), p in zip(rec, plan)] == [True] * 4
    assert all(g.shape == (64, 4) for _, g in rec)
    rows, s = L.norm_scores(rec)
    assert torch.equal(rows, torch.cat(plan)) and torch.allclose(s[:64], rec[0][1].norm(dim=1))
    assert not net.parties[1].received  # the label party records nothing of its own


def test_attacks_succeed_without_noise_and_fall_to_chance_with_it():
    clear = L.experiment(0.0, n=2000, epochs=4)
    noisy = L.experiment(0.1, n=2000, epochs=4)
    assert clear["norm_auc"] >= 0.85 and clear["cosine_auc"] >= 0.9
    assert abs(noisy["norm_auc"] - 0.5) <= 0.08 and abs(noisy["cosine_auc"] - 0.5) <= 0.08
    assert clear["test_auc"] >= 0.9  # the model itself learns the task ...
    assert noisy["test_auc"] < clear["test_auc"] - 0.1  # ... and this much noise costs accuracy
