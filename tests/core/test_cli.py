"""The atoll command, run in-process."""
import json

import pytest

from atoll.cli import main

TINY = """
name = "tiny"
rounds = 3
[data]
name = "wine"
num_clients = 4
[model]
name = "logreg"
[sampling]
clients_per_round = 2
"""


@pytest.mark.parametrize("cmd", [[], ["run"], ["report"], ["compare"], ["datasets"], ["privacy"], ["privacy", "epsilon"]])
def test_help_on_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: atoll" in capsys.readouterr().out


def test_datasets_lists_builtins(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "breast_cancer", "wine", "synthetic"):
        assert name in out


def test_run_report_and_resume(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run), "--quiet", "--set", "rounds=2"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"rounds.png", "bytes.png", "clients.png"}
    assert (run / "summary.md").exists() and (run / "model.pt").exists()
    # resume with more rounds: continues from round 2, does not redo rounds
    assert main(["run", "--resume", str(run), "--quiet", "--set", "rounds=3"]) == 0
    rounds = [json.loads(s)["round"] for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    assert main(["report", str(run)]) == 0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[data]\nnum_client = 3\n")
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert "did you mean 'data.num_clients'" in capsys.readouterr().err
    csv = tmp_path / "records.csv"
    csv.write_text("age,bmi,outcome\n50,22.1,1\n61,30.2,0\n")
    cfg.write_text(f'[data]\nname = "{csv}"\nlabel = "diagnosis"\nnum_clients = 1\n')
    assert main(["run", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "diagnosis" in err and "outcome" in err  # names the missing column and those present
