"""Runs that silently lose or mix results (issue 12, section 7): a non-empty run folder is
refused, a resume may not change the run, a run whose clients all fail stops with the cause,
``simulate`` defaults to the CLI's runtime and the README example is reproducible."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from atoll import config, models
from atoll.cli import main
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import AllClientsFailed, simulate

TINY = """
name = "tiny"
rounds = 2
[data]
name = "wine"
num_clients = 4
[model]
name = "logreg"
[sampling]
clients_per_round = 2
[checkpoint]
every = 1
"""


def _rounds(run: Path) -> list[int]:
    return [json.loads(s)["round"] for s in (run / "metrics.jsonl").read_text().splitlines()]


def _cli(tmp_path, *args):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    return main(["run", str(cfg), "--quiet", *args])


def test_out_onto_an_existing_run_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(tmp_path, "--out", str(run), "--set", "rounds=3") == 0
    before = (run / "metrics.jsonl").read_bytes()
    assert _cli(tmp_path, "--out", str(run), "--set", "client.lr=0.5") == 2
    err = capsys.readouterr().err
    assert str(run) in err and "--overwrite" in err and "--resume" in err
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing lost
    assert _cli(tmp_path, "--out", str(run), "--overwrite", "--set", "client.lr=0.5") == 0
    assert _rounds(run) == [1, 2]  # the new run only, nothing of the old one left
    assert "lr = 0.5" in (run / "config.toml").read_text()
    assert not list(run.glob("checkpoint.clients-*"))


def test_simulate_refuses_a_non_empty_folder_unless_told(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    alg, model, fed, plan = config.build(config.load(text=TINY))
    with pytest.raises(ValueError, match="not empty"):
        simulate(alg, model, fed, plan, run_dir=tmp_path, plots=False)
    simulate(alg, model, fed, plan, run_dir=tmp_path, plots=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # overwrite removes only a run's files
    assert _rounds(tmp_path) == [1, 2]


def test_resume_refuses_changes_that_alter_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(tmp_path, "--out", str(run)) == 0
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["run", "--resume", str(run), "--quiet", "--set", "client.lr=0.9",
                 "--set", "seed=3", "--set", "rounds=4"]) == 2
    err = capsys.readouterr().err
    assert "it changes client.lr (0.05 -> 0.9), seed (0 -> 3)." in err  # rounds may grow
    assert (run / "metrics.jsonl").read_bytes() == before
    assert 'lr = 0.05' in (run / "config.toml").read_text()


def test_resume_may_extend_rounds_and_records_it(tmp_path):
    run = tmp_path / "run"
    assert _cli(tmp_path, "--out", str(run)) == 0
    assert main(["run", "--resume", str(run), "--quiet", "--set", "rounds=3"]) == 0
    assert _rounds(run) == [1, 2, 3]
    assert re.search(r"^rounds = 3$", (run / "config.toml").read_text(), re.M)
    assert main(["run", "--resume", str(run), "--quiet"]) == 0  # resumes the recorded 3 rounds
    assert _rounds(run) == [1, 2, 3]


def _nan_data(fed):
    """Every client's training features are NaN: every update is not finite."""
    bad = [dataclasses.replace(c, x=torch.full_like(c.x, float("nan"))) for c in fed.clients]
    return dataclasses.replace(fed, clients=bad)


@pytest.mark.parametrize("runtime", [LoopRuntime, VmapRuntime])
def test_a_run_whose_clients_all_fail_stops_naming_the_cause(tmp_path, runtime):
    alg, model, fed, plan = config.build(config.load(text=TINY))
    with pytest.raises(AllClientsFailed, match=r"round 1: all 2 sampled clients failed.*not finite"):
        simulate(alg, model, _nan_data(fed), plan, run_dir=tmp_path, runtime=runtime(), plots=False)
    assert not (tmp_path / "final.json").exists()  # no final accuracy of an untrained model
    assert "not finite" in (tmp_path / "metrics.jsonl").read_text()  # the cause is recorded


def test_an_async_run_whose_clients_all_fail_stops(tmp_path):
    cfg = config.load(text=TINY, overrides=["async.mode=fedbuff", "async.concurrency=2",
                                            "async.buffer=2"])
    alg, model, fed, plan = config.build(cfg)
    with pytest.raises(AllClientsFailed, match=r"all 4 clients failed.*not finite"):
        simulate(alg, model, _nan_data(fed), plan, runtime=LoopRuntime(), plots=False)


def test_cli_exits_non_zero_when_every_client_fails(tmp_path, capsys, monkeypatch):
    from atoll.config import assemble  # where ``build`` looks ``build_data`` up

    monkeypatch.setattr(assemble, "build_data", lambda cfg, _b=assemble.build_data: _nan_data(_b(cfg)))
    assert _cli(tmp_path, "--out", str(tmp_path / "run")) == 1
    assert "all 2 sampled clients failed" in capsys.readouterr().err


def test_simulate_defaults_to_the_cli_runtime(tmp_path, monkeypatch):
    calls = []
    real = VmapRuntime.run_round
    monkeypatch.setattr(VmapRuntime, "run_round", lambda self, *a: calls.append(1) or real(self, *a))
    alg, model, fed, plan = config.build(config.load(text=TINY))
    simulate(alg, model, fed, plan, plots=False)
    assert len(calls) == plan.rounds


def _readme_snippet() -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"## The same experiment in Python\s+```python\n(.*?)```", text, re.S).group(1)
    assert "models.build" in code and "rounds=30" in code
    return code.replace("rounds=30", "rounds=2").replace("progress=True", "plots=False")


def test_readme_example_is_reproducible(tmp_path, capsys):
    code = _readme_snippet()
    finals = []
    for name in ("a", "b"):
        scope = {}
        exec(code.replace('"runs/digits-script"', repr(str(tmp_path / name))), scope)  # noqa: S102
        finals.append(scope["result"].final)
    assert finals[0]["test_loss"] == finals[1]["test_loss"]
    assert (tmp_path / "a/metrics.jsonl").read_bytes() == (tmp_path / "b/metrics.jsonl").read_bytes()


def test_models_build_is_seeded():
    a = models.build("mlp", 8, 3, hidden=[5])
    b = models.build("mlp", 8, 3, hidden=[5])
    c = models.build("mlp", 8, 3, hidden=[5], seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
