"""End-to-end runs of the driver: determinism, resume, failing clients, stragglers."""
import json

import pytest
import torch

from atoll import config, tree as T
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.round import client_round
from atoll.simulation import simulate
from atoll.transport import wire

SMALL = """
rounds = 4
dtype = "float64"
[data]
name = "wine"
num_clients = 5
partition = "dirichlet"
alpha = 1.0
[model]
name = "mlp"
hidden = [8]
[client]
lr = 0.1
batch_size = 8
[sampling]
clients_per_round = 4
[checkpoint]
every = 2
"""


def _run(tmp, text=SMALL, overrides=(), runtime=None, resume=False, run_dir=None):
    cfg = config.load(text=text, overrides=list(overrides))
    alg, model, data, plan = config.build(cfg)
    return simulate(alg, model, data, plan, run_dir=run_dir or tmp, runtime=runtime or LoopRuntime(),
                    resume=resume, config_text=config.dumps(cfg), plots=False)


def test_same_seed_gives_byte_identical_metrics(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    assert (tmp_path / "a/metrics.jsonl").read_bytes() == (tmp_path / "b/metrics.jsonl").read_bytes()
    assert all(torch.equal(a.state.params[k], b.state.params[k]) for k in a.state.params)
    c = _run(tmp_path / "c", overrides=["seed=1"])
    assert (tmp_path / "a/metrics.jsonl").read_bytes() != (tmp_path / "c/metrics.jsonl").read_bytes()


def test_metrics_lines_and_run_folder(tmp_path):
    res = _run(tmp_path)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2, 3, 4]
    model_bytes = len(wire.dumps(T.join({"params": res.state.params})))
    for m in lines:
        assert m["clients_sampled"] == m["clients_succeeded"] == 4
        assert m["bytes_down"] == 4 * model_bytes  # every broadcast is a real message
        assert m["bytes_up"] > 4 * (model_bytes - 200)
        assert 0 <= m["test_acc"] <= 1 and m["train_loss"] > 0
        assert m["fed_acc_min"] <= m["fed_acc_p10"] <= 1
    assert lines[-1]["bytes_up_cum"] == sum(m["bytes_up"] for m in lines)
    for f in ("final.json", "model.pt", "checkpoint.pt", "config.toml", "timings.jsonl"):
        assert (tmp_path / f).exists(), f
    assert len(json.loads((tmp_path / "final.json").read_text())["client_acc"]) == 5


class _Crash(LoopRuntime):
    def run_round(self, algorithm, client_update, state, *args):
        if state.round == 3:
            raise KeyboardInterrupt  # killed during round 4, after the round-2 checkpoint + round 3
        return super().run_round(algorithm, client_update, state, *args)


def test_resume_gives_identical_metrics(tmp_path):
    _run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", runtime=_Crash())
    assert len((tmp_path / "cut/metrics.jsonl").read_text().splitlines()) == 3
    _run(tmp_path / "cut", resume=True)
    assert (tmp_path / "cut/metrics.jsonl").read_bytes() == (tmp_path / "full/metrics.jsonl").read_bytes()


class _Faulty(LoopRuntime):
    """Client 0 raises; client 1 sends NaN; client 2 sends a wrong shape."""

    @staticmethod
    def client_round(algorithm, client_update, down_bytes, cstate, cdata, cid, r, work, seed):
        if cid == 0:
            raise RuntimeError("out of memory on device")
        msg, st, met, strag = client_round(algorithm, client_update, down_bytes, cstate, cdata, cid, r, work, seed)
        parts = T.split(wire.loads(msg))
        k = next(iter(parts["delta"]))
        if cid == 1:
            parts["delta"][k] = parts["delta"][k] * float("nan")
        if cid == 2:
            parts["delta"][k] = parts["delta"][k][:1]
        return wire.dumps(T.join(parts)), st, met, strag


def test_failing_and_nan_clients_are_dropped(tmp_path):
    res = _run(tmp_path, overrides=["sampling.clients_per_round=5"], runtime=_Faulty())
    for m in res.metrics:
        assert m["clients_sampled"] == 5 and m["clients_succeeded"] == 2
        reasons = dict(m["failures"])
        assert "out of memory" in reasons[0] and "not finite" in reasons[1] and "shape" in reasons[2]
    assert T.all_finite(res.state.params)
    assert res.final["test_acc"] > 0.5


def test_stragglers_dropped_or_kept(tmp_path):
    drop = _run(tmp_path / "d", overrides=["client.stragglers=1.0", "client.drop_stragglers=true", "rounds=2", "client.batch_size=2"])
    assert all(m["clients_succeeded"] == 0 and m["stragglers_dropped"] == 4 for m in drop.metrics)
    init = _run(tmp_path / "i", overrides=["rounds=1", "client.lr=1e-300"]).state.params
    assert all(torch.allclose(drop.state.params[k], init[k]) for k in init)  # nothing applied
    keep = _run(tmp_path / "k", overrides=["client.stragglers=1.0", "rounds=2", "client.batch_size=2"])
    assert all(m["clients_succeeded"] == 4 for m in keep.metrics)


def test_poisson_sampling_with_empty_rounds(tmp_path):
    res = _run(tmp_path, overrides=["sampling.method=poisson", "sampling.rate=0.2", "rounds=6"])
    sizes = [m["clients_sampled"] for m in res.metrics]
    assert 0 in sizes and max(sizes) > 0  # some rounds are empty, the run goes on
    for m in res.metrics:
        if m["clients_sampled"] == 0:
            assert m["train_loss"] is None and m["bytes_up"] == 0


def test_byte_ratios_against_float32(tmp_path):
    """FedAvg in float32 sends the float32 model both ways: ratios are 1 up to the header."""
    res = _run(tmp_path / "r", overrides=['dtype="float32"'])
    for m in res.metrics:
        assert m["bytes_down_mean"] == m["bytes_down"] / m["clients_sampled"]
        assert m["ratio_down"] == 1.0
        assert abs(m["ratio_up"] - 1.0) < 1e-3
    res64 = _run(tmp_path / "d")  # float64 weights: twice the float32 bytes
    assert all(0.5 < m["ratio_up"] < 0.6 for m in res64.metrics)  # headers are not doubled
