"""The robust learning rate (Ozdayi et al., AAAI 2021) against a per-coordinate loop oracle, its
config entry, the inputs it refuses, and a run through both runtimes with its anomaly log."""
import json
import math

import numpy as np
import pytest
import torch

from atoll import aggregators as A
from atoll import config
from atoll import tree as T
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate
from test_anomaly import BASE as RUN


def as_tree(x):
    return {"a": torch.tensor(x[:, :3]), "b": torch.tensor(x[:, 3:]).reshape(len(x), -1, 2)}


def run(agg, x, weights=None):
    tree = as_tree(x)
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else torch.tensor(weights)
    out, st = agg.aggregate(tree, w, agg.init({k: v[0] for k, v in tree.items()}))
    return T.flatten(out).numpy(), st


def cohort(n=9, d=11, seed=0):
    """Updates with exact zeros (abstentions) and coordinates where the votes are close."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d))
    x[g.random(size=(n, d)) < 0.25] = 0.0
    x[:, 0] = 0.0           # nobody votes: |sum| = 0
    x[:2, 1] = [5.0, 7.0]   # only two clients move it (a trigger's weight)
    x[2:, 1] = 0.0
    x[:, 2] = np.abs(x[:, 2]) + 0.1  # everyone agrees: |sum| = n
    return x


def oracle(x, weights, theta, centre):
    """Per coordinate j, in Python loops: the vote over participating rows, then keep or negate
    ``centre[j]``."""
    keep = [i for i in range(len(x)) if weights[i] > 0]
    out = []
    for j in range(x.shape[1]):
        vote = 0
        for i in keep:
            v = float(x[i, j])
            vote += 1 if v > 0 else (-1 if v < 0 else 0)
        out.append(centre[j] if abs(vote) >= theta else -centre[j])
    return np.array(out)


def oracle_mean(x, weights):
    return np.array([sum(w * float(x[i, j]) for i, w in enumerate(weights)) / sum(weights)
                     for j in range(x.shape[1])])


def oracle_clip_mean(x, weights):
    norms = sorted(math.sqrt(sum(float(v) ** 2 for v in row)) for row in x)
    n = len(norms)
    c = norms[n // 2] if n % 2 else (norms[n // 2 - 1] + norms[n // 2]) / 2
    clipped = [row * min(1.0, c / math.sqrt(sum(float(v) ** 2 for v in row))) for row in x]
    return oracle_mean(np.array(clipped), weights)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("theta", [1, 3, 5, 8])  # up to the 8 voters of n = 9
@pytest.mark.parametrize("n", [9, 10])
def test_rlr_equals_its_per_coordinate_oracle(theta, n):
    for seed in range(3):
        x = cohort(n=n, seed=seed)
        w = np.random.default_rng(seed).integers(1, 50, size=n).astype(float)
        w[3] = 0.0  # not taking part: no vote, no weight
        x[3] = 100.0  # and its row is ignored
        got, st = run(A.rlr(theta), x, w)  # inner: the sample-weighted mean; votes: one per client
        close(got, oracle(x, w, theta, oracle_mean(x, w)))
        live = w > 0
        close(run(A.rlr(theta, A.norm_bound("median", A.mean("uniform"))), x, w)[0],
              oracle(x, w, theta, oracle_clip_mean(x[live], w[live])))
        votes = [abs(sum(np.sign(x[live, j]))) for j in range(x.shape[1])]
        assert st["flipped"] == pytest.approx(np.mean([v < theta for v in votes]), rel=1e-12)


def test_the_vote_flips_what_few_clients_move_and_keeps_what_all_agree_on():
    x = cohort(n=9, seed=4)
    mean = x.mean(axis=0)
    got, _ = run(A.rlr(3, A.mean("uniform")), x)
    assert got[0] == 0.0  # nobody voted: the mean is 0 there, flipped or not
    assert got[1] == pytest.approx(-mean[1], rel=1e-12) and mean[1] > 0  # two movers: |sum| = 2 < 3
    assert got[2] == pytest.approx(mean[2], rel=1e-12)  # unanimous: kept
    close(run(A.rlr(1, A.median()), x)[0],  # theta = 1 flips only the coordinates with a zero vote
          np.where([abs(np.sign(x[:, j]).sum()) < 1 for j in range(x.shape[1])], -1, 1)
          * run(A.median(), x)[0])


def test_rlr_ignores_claimed_sizes_and_client_order_with_a_uniform_inner_rule():
    x = cohort(n=11, seed=6)
    agg = A.rlr(4, A.multi_krum(2))
    base, _ = run(agg, x)
    perm = np.random.default_rng(0).permutation(11)
    close(run(agg, x[perm])[0], base)
    assert agg.weights([0, 1], torch.tensor([5.0, 500.0])).tolist() == [1.0, 1.0]


def test_rlr_passes_the_inner_rules_exclusions_and_prepare_through():
    x = cohort(n=9, seed=1)
    x[0] *= 1e6
    _, st = run(A.rlr(3, A.krum(1)), x)
    assert 0 in st["excluded"] and len(st["excluded"]) == 8
    g0 = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(4, 2, dtype=torch.float64)}
    agg = A.rlr(2, A.fltrust(lambda params, key: g0))
    st = agg.prepare(agg.init(g0), g0, 0)
    out, _ = agg.aggregate(as_tree(np.abs(x) + 1.0), torch.ones(9, dtype=torch.float64), st)
    assert torch.all(T.flatten(out) > 0)  # all positive: unanimous votes, nothing flipped


@pytest.mark.parametrize("theta", [0, -1, 2.5, float("nan"), float("inf"), True, "3", None])
def test_rlr_refuses_a_theta_that_is_not_a_positive_integer(theta):
    with pytest.raises(ValueError, match="rlr: theta must be an integer >= 1"):
        A.rlr(theta)


def test_rlr_refuses_a_cohort_smaller_than_theta():
    x = cohort(n=5)
    with pytest.raises(ValueError, match=r"rlr: a cohort of 4 updates is too small \(theta = 5"):
        run(A.rlr(5), x, [1.0, 1.0, 0.0, 1.0, 1.0])


def test_rlr_built_from_the_config():
    def build(text):
        return config.build_aggregator(config.load(text="[aggregator]\nname = 'rlr'\n" + text))

    assert build("theta = 3\n").name == "rlr(theta=3)(mean)"
    assert build("theta = 3\ninner = 'median'\n").name == "rlr(theta=3)(median)"
    clip = build("theta = 4\ninner = 'norm_bound'\nc = 'median'\nnnm = true\nf = 1\n")
    assert clip.name == "nnm(f=1)(rlr(theta=4)(norm_bound(c=median)(mean)))" and clip.needs_individual
    x, agg = cohort(n=10), build("theta = 4\n")
    w = agg.weights(list(range(10)), torch.arange(1.0, 11.0, dtype=torch.float64))
    close(run(agg, x, w.numpy())[0], oracle(x, np.ones(10), 4, x.mean(axis=0)))  # uniform: claims ignored


@pytest.mark.parametrize("text, message", [
    ("name = 'rlr'\n", "needs aggregator.theta"),
    ("name = 'rlr'\ntheta = 11\n", r"aggregator.theta = 11 exceeds the 10 sign votes.*num_clients = 10"),
    ("name = 'rlr'\ntheta = 4\n[sampling]\nclients_per_round = 3\n", "theta = 4 exceeds the 3 sign votes"),
    ("name = 'rlr'\ntheta = 5\nbucket = 3\n", r"theta = 5 exceeds the 4 sign votes.*bucket = 3"),
    ("name = 'rlr'\ntheta = 3\ninner = 'norm_bound'\n", "needs aggregator.c"),
    ("name = 'median'\ntheta = 3\n", "aggregator.theta = 3 is rlr's threshold"),
    ("name = 'norm_bound'\nc = 1.0\ninner = 'norm_bound'\n", "inner = \"norm_bound\" is rlr's clipping")])
def test_rlr_config_refused_by_name(text, message):
    with pytest.raises(config.ConfigError, match=message):
        config.build_aggregator(config.load(text="[aggregator]\n" + text))


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "nan", "'three'", "true"])
def test_rlr_config_theta_must_be_a_positive_integer(value):
    with pytest.raises(config.ConfigError, match="aggregator.theta"):
        config.load(text=f"[aggregator]\nname = 'rlr'\ntheta = {value}\n")


def test_rlr_under_a_secure_sum_is_refused():
    text = "[aggregator]\nname = 'rlr'\ntheta = 3\n[secure]\nmethod = 'secagg'\nclip = 1.0\n"
    with pytest.raises(config.ConfigError, match="aggregator.name = 'rlr' needs each client's update"):
        config.build(config.load(text=text))


# test_anomaly's run (digits, 8 clients, 3 local steps), shorter, under RLR and a backdoor
BASE = (RUN.replace("rounds = 4", "rounds = 3").replace("seed = 3", "seed = 2")
        .replace("every = 4", "every = 3") + """[aggregator]
name = 'rlr'
theta = 3
inner = 'norm_bound'
c = 'median'
[attack]
name = 'backdoor'
clients = [6, 7]
""")


def test_rlr_runs_alike_in_the_loop_and_vmap_runtimes_and_logs_its_flips(tmp_path):
    res = {}
    for name, runtime in (("loop", LoopRuntime()), ("vmap", VmapRuntime())):
        alg, model, fed, plan = config.build(config.load(text=BASE))
        res[name] = simulate(alg, model, fed, plan, runtime=runtime, run_dir=tmp_path / name, plots=False)
    a, b = T.flatten(res["loop"].state.params), T.flatten(res["vmap"].state.params)
    # the vote is a step function: a coordinate whose updates are rounding-level numbers may vote
    # otherwise in the other runtime's float64 summation order and flip; all others agree
    off = ~torch.isclose(a, b, rtol=1e-9, atol=1e-9 * float(a.abs().max()))
    assert int(off.sum()) <= 1e-3 * a.numel(), int(off.sum())
    log = [json.loads(ln) for ln in (tmp_path / "vmap" / "anomaly.jsonl").read_text().splitlines()]
    assert [ln["round"] for ln in log] == [1, 2, 3]
    assert all(ln["rule"] == "rlr(theta=3)(norm_bound(c=median)(mean))" and ln["excluded"] == []
               and 0.0 < ln["flipped"] < 1.0 for ln in log), log


def test_the_benchmark_names_rlr_rules_by_theta_and_inner():
    import robustness as bench  # bench/robustness.py (tests/conftest.py)
    for rule, name in [("rlr(theta=3)", "rlr(theta=3)(mean)"),
                       ("rlr(theta=4)+median", "rlr(theta=4)(median)"),
                       ("rlr(theta=3)+norm_bound(median)", "rlr(theta=3)(norm_bound(c=median)(mean))")]:
        text = bench.config_text("dir0.1", rule, 2, "backdoor", 1, 0)
        assert config.build_aggregator(config.load(text=text)).name == name
