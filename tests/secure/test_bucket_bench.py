"""bench/robustness.py's fast path for robust rules over secure buckets: ``PlainSum`` (the plain
ring sum of the same encoded inputs) must give the SecAgg protocol's run bit for bit."""
import dataclasses

import numpy as np
import robustness as R  # bench/robustness.py (tests/conftest.py)
import torch

from atoll import config
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate


def _run(rule, f, attack, rounds, plain):
    cfg = config.load(text=R.config_text("dir0.1", rule, f, attack, rounds, 0))
    alg, model, fed, plan = config.build(cfg)
    if plain:
        alg = dataclasses.replace(alg, secure=R.PlainSum(**vars(alg.secure)))
    return simulate(alg, model, fed, plan, runtime=VmapRuntime(), plots=False)


def test_plain_sum_decodes_the_protocols_sum_bit_for_bit():
    g = np.random.default_rng(0)
    like = {"w": torch.zeros(40, dtype=torch.float64)}
    sec = R.SecureSum(clip=1.0, max_weight=50.0, input_bits=16, bucket=2)
    inputs = {c: sec.encode({"w": torch.from_numpy(g.normal(0, 0.7, 40))}, float(c * 7 + 1), c)
              for c in (3, 5, 8)}
    mean, _ = sec.aggregate(inputs, 4, like)
    fast, _ = R.PlainSum(**vars(sec)).aggregate(inputs, 4, like)
    assert torch.equal(mean["w"], fast["w"])
    ints = np.stack(list(inputs.values()))  # the weighted mean the encoding promises
    want = ints[:, :-1].sum(0) / ints[:, -1].sum() * sec.clip
    assert np.array_equal(fast["w"].numpy(), want)


def test_a_robust_rule_over_plain_summed_buckets_is_the_secure_run():
    """Median over secure buckets of 3 under two sign-flipping attackers (12 clients, 4
    buckets each round): the same model, bit for bit."""
    runs = [_run("secure(s=3) median", 2, "sign_flip", 3, plain) for plain in (False, True)]
    for k, v in runs[0].state.params.items():
        assert torch.equal(v, runs[1].state.params[k]), k
    assert runs[0].final["test_acc"] == runs[1].final["test_acc"]
    for run in runs:
        assert [(m["secure_buckets"], m["secure_survivors"]) for m in run.metrics] == [(4, 12)] * 3


def test_merged_runs_take_the_worst_over_every_attack_run(tmp_path):
    row = dict(data="digits", split="iid", f=2, rule="secure(s=2) median", clean=None, seconds=1.0)
    (tmp_path / "a.json").write_text(R.json.dumps([{**row, "all": {"sign_flip": 0.7}}]))
    (tmp_path / "b.json").write_text(R.json.dumps([
        {**row, "clean": 0.9, "all": {"ipm": 0.6, "alie": 0.8}},
        {**row, "rule": "secure(s=2) multi_krum", "error": "multi_krum(f=2): too small"}]))
    got = R.merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert len(got) == 2 and got[1]["error"].startswith("multi_krum")
    assert got[0]["all"] == {"sign_flip": 0.7, "ipm": 0.6, "alie": 0.8}
    assert (got[0]["worst"], got[0]["worst_attack"], got[0]["clean"], got[0]["seconds"]) == (0.6, "ipm", 0.9, 2.0)


def test_a_secure_rule_name_is_its_inner_rule_with_buckets():
    assert R.rule_text("secure(s=3) centered_clipping") == R.RULES["centered_clipping"] + "\nbucket = 3"
    assert "[secure]" in R.config_text("iid", "secure(s=3) median", 1, "ipm", 5, 0)
    assert "[secure]" not in R.config_text("iid", "median", 1, "ipm", 5, 0)


def test_seeds_reproduce_and_differ(tmp_path):
    """``--seeds`` reaches the Byzantine table: the same seed gives the same row bit for bit, another
    seed another one; every row names its seed."""
    a = R.arguments(["--data", "digits", "--split", "dir0.1", "--f", "1", "--seeds", "0,1,0",
                     "--attacks", "sign_flip", "--rounds", "2", "--secure-sum", "plain",
                     "--attackers", "share"])  # byzfl: 2 rounds of sign flip end in one class for both
    rows = R.grid(a, ["secure(s=2) median"], tmp_path / "rows.json")
    assert [r["seed"] for r in rows] == [0, 1, 0]
    got = [(r["clean"], r["all"]["sign_flip"]) for r in rows]
    assert got[0] == got[2]
    assert got[0][0] != got[1][0] and got[0][1] != got[1][1]
    assert R.json.loads((tmp_path / "rows.json").read_text()) == rows


def test_merge_keeps_seeds_apart_and_takes_clean_from_a_clean_only_run(tmp_path):
    row = dict(data="digits", split="iid", f=1, rule="median", seconds=1.0)
    (tmp_path / "a.json").write_text(R.json.dumps([
        {**row, "clean": None, "all": {"ipm": 0.7}},  # written before --seeds: seed 0
        {**row, "seed": 1, "clean": None, "all": {"ipm": 0.5}}]))
    (tmp_path / "b.json").write_text(R.json.dumps([{**row, "seed": 1, "clean": 0.9, "all": {}}]))
    got = sorted(R.merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")]), key=lambda r: r["seed"])
    assert [(r["seed"], r["worst"], r["clean"]) for r in got] == [(0, 0.7, None), (1, 0.5, 0.9)]
