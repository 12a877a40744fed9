"""bench/secure_bucket_classes.py (the secure-bucket diagnosis probe) must run what
bench/robustness.py runs: the same accuracy bit for bit with the default draw and each weighting,
per-class accuracies that average back to it, and its knobs must change what they claim to."""
import numpy as np
import pytest
import secure_bucket_classes as P  # bench/secure_bucket_classes.py (tests/conftest.py)
import torch

from atoll import rng

R = P.R
RULE = "secure(s=2) centered_clipping(tau=median)"


@pytest.mark.parametrize("weights,max_weight", [("one", None), ("count", 0)])
def test_the_probe_runs_the_bench_run(weights, max_weight):
    got = P.run(RULE, "dir0.1", 2, "sign_flip", seed=5, rounds=3, weights=weights)
    want = R.one("digits", "dir0.1", RULE, 2, "sign_flip", 3, seed=5, plain_sum=True,
                 attackers="share",
                 max_weight=max_weight)
    assert got["acc"] == round(want, 4)
    cfg = P.config.load(text=R.config_text("dir0.1", RULE, 2, "sign_flip", 3, 5))
    _, _, fed, _ = P.config.build(cfg)
    freq = torch.bincount(fed.y_test, minlength=10).double() / len(fed.y_test)
    assert float((freq * torch.tensor(got["per_class"], dtype=torch.float64)).sum()) == \
        pytest.approx(want, abs=6e-3)  # per-class figures are rounded to 3 digits
    assert [sum(c) for c in got["counts"]] == [c.n for c in fed.clients]


def test_the_knobs():
    base = P.run(RULE, "dir0.1", 2, "sign_flip", seed=5, rounds=6, weights="count")
    # the attackers' own counts are not the split's largest here, so claiming it changes the run
    counts = [sum(c) for c in base["counts"]]
    assert max(counts[10:]) < max(counts)
    claim = P.run(RULE, "dir0.1", 2, "sign_flip", seed=5, rounds=6, weights="count-claim")
    assert claim["acc"] != base["acc"] or claim["per_class"] != base["per_class"]
    # salt 0 is the run's own draw: the count of rounds with both attackers in one bucket
    want = 0
    for r in range(1, 7):
        order = np.random.default_rng(rng.key(5, r, rng.SERVER, "secure-buckets")).permutation(12)
        want += any(set(order[i:i + 2].tolist()) == {10, 11} for i in range(0, 12, 2))
    assert base["rounds_attackers_together"] == want
    one = P.run(RULE, "dir0.1", 2, "sign_flip", seed=5, rounds=6)
    salted = [P.run(RULE, "dir0.1", 2, "sign_flip", seed=5, rounds=6, salt=s) for s in (1, 2)]
    assert all((x["acc"], x["per_class"]) != (one["acc"], one["per_class"]) for x in salted)


@pytest.mark.parametrize("rule", ["centered_clipping(tau=median)", RULE])
def test_the_trace_leaves_the_run_alone_and_accounts_for_every_client(rule):
    plain = P.run(rule, "dir0.1", 2, "sign_flip", seed=5, rounds=10)
    traced = P.run(rule, "dir0.1", 2, "sign_flip", seed=5, rounds=10, trace=True)
    assert traced["acc"] == plain["acc"] and traced["per_class"] == plain["per_class"]
    t = traced["trace"]
    assert sorted(int(c) for c in t["share_last10"]) == list(range(12))
    assert sum(t["share_last10"].values()) == pytest.approx(1.0, abs=7e-3)  # 12 rounded shares
    assert t["radius_last5"][0] <= t["radius_last5"][1]
    assert P.A.centered_clipping.__name__ == "centered_clipping"  # restored after the run


def test_shrink_one_is_the_rule_before_and_the_default_is_one_over_sqrt_s():
    default = P.run(RULE, "dir0.1", 2, "sign_flip", seed=5, rounds=8)
    same = P.run(RULE, "dir0.1", 2, "sign_flip", seed=5, rounds=8, shrink=0.5 ** 0.5)
    before = P.run(RULE, "dir0.1", 2, "sign_flip", seed=5, rounds=8, shrink=1.0, trace=True)
    assert (same["acc"], same["per_class"]) == (default["acc"], default["per_class"])
    assert (before["acc"], before["per_class"]) != (default["acc"], default["per_class"])
    assert P.A.centered_clipping.__name__ == "centered_clipping"  # restored after the run
