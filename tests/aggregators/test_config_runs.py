"""``[aggregator]`` in a config: the rules train, compose, resume and refuse parts that would
bypass them."""
import pytest
import torch

from atoll import config, tree as T
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

BASE = """
rounds = 8
seed = 1
dtype = "float64"
[data]
name = "digits"
num_clients = 10
[client]
lr = 0.1
batch_size = 16
[eval]
federated = false
"""


def run(extra, runtime, tmp_path):
    cfg = config.load(text=BASE + extra)
    alg, model, fed, plan = config.build(cfg)
    return simulate(alg, model, fed, plan, runtime=runtime, run_dir=tmp_path / "r")


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "multi_krum", "geometric_median"])
def test_robust_rules_train_digits_like_the_mean(rule, tmp_path):
    mean = run("", LoopRuntime(), tmp_path / "mean").final["test_acc"]
    got = run(f"[aggregator]\nname = '{rule}'\nf = 2\n", LoopRuntime(), tmp_path / rule).final["test_acc"]
    assert mean > 0.85 and got > mean - 0.05, (rule, got, mean)


def test_loop_and_vmap_runtimes_agree_under_a_robust_rule(tmp_path):
    extra = "[aggregator]\nname = 'trimmed_mean'\nf = 1\nnnm = true\n"
    a = run(extra, LoopRuntime(), tmp_path / "a").state.params
    b = run(extra, VmapRuntime(), tmp_path / "b").state.params
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9 * float(a[k].abs().max()))


def test_composed_rules_are_built_from_the_config():
    cfg = config.load(text="[aggregator]\nname='norm_bound'\nc=2.0\ninner='median'\nnnm=true\nf=1\nbucket=2\n")
    agg = config.build_aggregator(cfg)
    assert agg.name == "bucketing(s=2)(nnm(f=1)(norm_bound(c=2.0)(median)))"
    with pytest.raises(config.ConfigError, match="needs aggregator.c"):
        config.build_aggregator(config.load(text="[aggregator]\nname='norm_bound'\n"))
    median = config.load(text="[aggregator]\nname='norm_bound'\nc='median'\ninner='multi_krum'\nf=2\n")
    assert config.build_aggregator(median).name == "norm_bound(c=median)(multi_krum(f=2))"
    cc = config.load(text="[aggregator]\nname='centered_clipping'\ntau='median'\niters=3\n")
    assert config.build_aggregator(cc).name == "centered_clipping(tau=median)"
    # over secure buckets of s the median radius shrinks by 1/sqrt(s); plaintext bucketing and a
    # fixed radius keep theirs
    sec = "[secure]\nmethod='secagg'\n[aggregator]\nname='centered_clipping'\niters=3\nbucket="
    assert config.build_aggregator(config.load(text=sec + "2\ntau='median'\n")).name == \
        "centered_clipping(tau=median*0.7071)"
    assert config.build_aggregator(config.load(text=sec + "4\ntau='median'\n")).name == \
        "centered_clipping(tau=median*0.5)"
    assert config.build_aggregator(config.load(text=sec + "2\ntau=0.3\n")).name == "centered_clipping(tau=0.3)"
    plain = "[aggregator]\nname='centered_clipping'\ntau='median'\niters=3\nbucket=2\n"
    assert config.build_aggregator(config.load(text=plain)).name == \
        "bucketing(s=2)(centered_clipping(tau=median))"
    for bad in ("tau=0.0", "tau=-1.0", "tau=nan", "tau='mean'", "tau=true"):
        with pytest.raises(config.ConfigError, match="aggregator.tau"):
            config.load(text=f"[aggregator]\nname='centered_clipping'\n{bad}\n")
    for bad in ("c=-1.0", "c='mean'"):
        with pytest.raises(config.ConfigError, match="aggregator.c"):
            config.load(text=f"[aggregator]\nname='norm_bound'\n{bad}\n")


@pytest.mark.parametrize("extra, part", [
    ("[algorithm]\nname='fednova'\n", "algorithm.name = 'fednova'"),
    ("[algorithm]\nname='scaffold'\n", "algorithm.name = 'scaffold'"),
    ("[privacy]\nmode='dp_fedavg'\nnoise_multiplier=1.0\n", "privacy.mode = 'dp_fedavg'"),
    ("[async]\nmode='fedbuff'\n", "async.mode = 'fedbuff'"),
    ("[algorithm]\nweighting='uniform'\n", "algorithm.weighting = 'uniform'")])
def test_parts_that_would_bypass_a_robust_rule_are_refused_naming_both(extra, part):
    cfg = config.load(text="[aggregator]\nname='median'\n" + extra)
    with pytest.raises(config.ConfigError, match="aggregator.name = 'median'.*" + part.replace(".", r"\.")):
        config.build_aggregator(cfg)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_a_rule_for_iid_clients_on_heterogeneous_ones_is_warned_about(rule, caplog):
    """The coordinate-wise rules fall near chance at 2 labels per client, and Krum even on IID
    clients (docs/robustness.md): a config that asks for one where it fell is told so, and what
    to use; NNM, bucketing, and the coordinate-wise rules on IID labels (iid, quantity skew) are not."""
    text = "[data]\npartition='{}'\n[aggregator]\nname='{}'\nf=2\n{}"
    warned = []
    for partition, extra in [("shards", ""), ("dirichlet", ""), ("iid", ""), ("quantity", ""),
                             ("shards", "nnm=true\n"), ("shards", "bucket=2\n")]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="atoll.config.aggregation"):
            config.build_aggregator(config.load(text=text.format(partition, rule, extra)))
        warned.append([r.getMessage() for r in caplog.records])
    iid = rule == "krum"
    assert [bool(w) for w in warned] == [True, True, iid, iid, False, False]
    assert f"aggregator.name = '{rule}'" in warned[0][0] and "'shards'" in warned[0][0]
    assert "aggregator.nnm = true" in warned[0][0]
    assert ("use multi_krum" if rule == "krum" else "use centered_clipping") in warned[0][0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="atoll.config.aggregation"):
        config.build_aggregator(config.load(text=text.format("shards", "centered_clipping", "")))
    assert not caplog.records
