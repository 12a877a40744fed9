"""Per-client anomaly logs (``anomaly.jsonl``) and the FLTrust / FLAME config entries."""
import json

import numpy as np
import pytest
import torch

from atoll import aggregators as A
from atoll import config
from atoll.aggregators import anomaly
from atoll.runtime.loop import LoopRuntime
from atoll.simulation import simulate

BASE = """
rounds = 4
seed = 3
dtype = "float64"
[data]
name = "digits"
num_clients = 8
client_test_fraction = 0.0
[client]
lr = 0.1
batch_size = 16
steps = 3
[eval]
federated = false
every = 4
"""
SCALED = "[attack]\nname = 'scaled'\nclients = [5]\nscale = 20.0\n"


def run(extra, tmp_path, **kw):
    cfg = config.load(text=BASE + extra)
    alg, model, fed, plan = config.build(cfg)
    return simulate(alg, model, fed, plan, runtime=LoopRuntime(), run_dir=tmp_path, plots=False, **kw)


def lines(path):
    return [json.loads(ln) for ln in (path / "anomaly.jsonl").read_text().splitlines()]


def test_krum_logs_the_scaled_attacker_as_largest_norm_and_excluded(tmp_path):
    run("[aggregator]\nname = 'krum'\nf = 1\n" + SCALED, tmp_path / "r")
    log = lines(tmp_path / "r")
    assert [ln["round"] for ln in log] == [1, 2, 3, 4]
    for ln in log:
        assert ln["rule"] == "krum(f=1)" and ln["clients"] == list(range(8))
        assert len(ln["norm"]) == len(ln["dist"]) == len(ln["cos"]) == 8
        assert int(np.argmax(ln["norm"])) == 5 and int(np.argmax(ln["dist"])) == 5
        assert 5 in ln["excluded"] and len(ln["excluded"]) == 7  # krum keeps exactly one
        kept = (set(range(8)) - set(ln["excluded"])).pop()
        assert ln["dist"][kept] == 0.0 and ln["cos"][kept] == 1.0  # the centre is that update


def test_a_resumed_run_keeps_one_anomaly_line_per_round(tmp_path):
    extra = "[aggregator]\nname = 'median'\n" + SCALED + "[checkpoint]\nevery = 2\n"
    run(extra, tmp_path / "full")
    cfg = config.load(text=BASE.replace("rounds = 4", "rounds = 2") + extra)
    alg, model, fed, plan = config.build(cfg)
    simulate(alg, model, fed, plan, runtime=LoopRuntime(), run_dir=tmp_path / "r", plots=False)
    (tmp_path / "r" / "anomaly.jsonl").open("a").write('{"round": 3}\n')  # a line past the checkpoint
    run(extra, tmp_path / "r", resume=True)
    assert lines(tmp_path / "r") == lines(tmp_path / "full")
    assert all(ln["excluded"] == [] for ln in lines(tmp_path / "full"))  # coordinate-wise: nobody


def test_the_mean_writes_no_anomaly_log(tmp_path):
    run("", tmp_path / "r")
    assert not (tmp_path / "r" / "anomaly.jsonl").exists()


def test_fltrust_run_gives_a_sign_flipper_zero_trust_and_learns(tmp_path):
    res = run("[aggregator]\nname = 'fltrust'\nroot = 100\n"
              "[attack]\nname = 'sign_flip'\nclients = [2]\n", tmp_path / "r")
    log = lines(tmp_path / "r")
    assert all(ln["excluded"] == [2] and ln["trust"][2] == 0.0 for ln in log[1:]), log
    assert res.final["test_acc"] > 0.6


def test_report_maps_rows_to_client_ids_and_skips_zero_weights():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    rep = anomaly.report("r", {"a": x}, w, {"a": torch.tensor([0.0, 2.0], dtype=torch.float64)},
                         {"excluded": [1]}, [7, 8, 9])
    assert rep["clients"] == [7, 9] and rep["norm"] == [5.0, 2.0] and rep["excluded"] == [9]
    assert rep["dist"] == [float(f"{np.hypot(3, 2):.6g}"), 0.0] and rep["cos"] == [0.8, 1.0]


@pytest.mark.parametrize("extra, message", [
    ("name = 'fltrust'\n", "needs root data: set aggregator.root"),
    ("name = 'median'\nroot = 10\n", "aggregator.root = 10 is FLTrust's root data"),
    ("name = 'flame'\nnnm = true\n", "cannot run after aggregator.nnm"),
    ("name = 'fltrust'\nroot = 100000\n", "root = 100000: 100000 root samples asked of"),
    ("name = 'flame'\n[algorithm]\nname = 'scaffold'\n", "aggregator.name = 'flame' cannot be combined")])
def test_trust_rules_refused_where_they_cannot_work(extra, message):
    with pytest.raises(config.ConfigError, match=message):
        config.build(config.load(text=BASE + "[aggregator]\n" + extra))


def test_trust_rules_built_from_the_config():
    agg = config.build_aggregator(config.load(text="[aggregator]\nname = 'flame'\nlam = 0.01\n"))
    assert agg.name == "flame(lam=0.01)" and agg.needs_individual
    alg = config.build(config.load(text=BASE + "[aggregator]\nname = 'fltrust'\nroot = 50\n"))[0]
    assert alg.aggregator.name == "fltrust" and alg.aggregator.prepare is not None
    with pytest.raises(ValueError, match="lam must be >= 0"):
        A.flame(lam=-1.0)


def test_a_deployed_client_builds_an_fltrust_config_without_root_data():
    from types import SimpleNamespace
    cfg = config.load(text=BASE + "[aggregator]\nname = 'fltrust'\nroot = 50\n")
    alg = config.build(cfg, data=SimpleNamespace(n_features=64, n_classes=10, clients=[None] * 8))[0]
    with pytest.raises(RuntimeError, match="runs where the root data is"):
        alg.aggregator.prepare({}, {}, 0)
