"""`atoll run` with a [vertical] section: the run folder, the same losses as the deployed path's
code trained in one process, configurable split-NN shapes, and resume (float64, bit for bit)."""
import json

import numpy as np
import pytest
import torch

from atoll import config
from atoll.cli import main
from atoll.config.vertical import build
from atoll.deploy import vertical as deployed
from atoll.vertical import experiment
from atoll.vertical.channel import Channel
from atoll.vertical.protocol import LabelRun


def tables(tmp, n=150, extra=20, seed=0):
    """bank.csv (id, 3 features, default) and tel.csv (id, 2 features): ``n`` people in common,
    each party ``extra`` of its own, each table in its own order."""
    rng = np.random.default_rng(seed)
    xb, xt = rng.normal(size=(n + extra, 3)).tolist(), rng.normal(size=(n + extra, 2)).tolist()
    y = [int(b[0] + t[1] + 0.3 * e > 0) for b, t, e in zip(xb, xt, rng.normal(size=n + extra))]
    bank_ids = [f"c{i:03d}" for i in range(n + extra)]
    tel_ids = bank_ids[:n] + [f"t{i:03d}" for i in range(extra)]
    (tmp / "bank.csv").write_text("id,a,b,c,default\n" + "".join(
        f"{bank_ids[i]},{xb[i][0]!r},{xb[i][1]!r},{xb[i][2]!r},{y[i]}\n" for i in rng.permutation(n + extra)))
    (tmp / "tel.csv").write_text("id,u,v\n" + "".join(
        f"{tel_ids[i]},{xt[i][0]!r},{xt[i][1]!r}\n" for i in rng.permutation(n + extra)))
    (tmp / "common.txt").write_text("\n".join(bank_ids[:n]) + "\n")
    return bank_ids[:n]


def toml(tmp, **over):
    keys = {"data": {"bank": str(tmp / "bank.csv"), "telecom": str(tmp / "tel.csv")}, "name": "bank",
            "label": "default", "cut": 3, "hidden": [4], "lr": 0.05, "batch": 20, "epochs": 4,
            "psi": False} | over
    body = "".join(f"{k} = {config.files._toml(v)}\n" for k, v in keys.items())
    (tmp / "exp.toml").write_text(f'name = "v"\nseed = 7\nout_dir = "{tmp}"\n[vertical]\n{body}')
    return tmp / "exp.toml"


def test_atoll_run_writes_a_run_folder_with_per_epoch_metrics(tmp_path):
    tables(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(toml(tmp_path, psi=True, noise=0.01, bottom={"telecom": [5, 4]})),
                 "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / "final.json").read_text())
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4] and final["rows"] == 150
    assert final["steps"] == 4 * 6 == len(final["losses"]) and lines[-1]["steps"] == 24  # 105 train rows
    assert final["test_rows"] == 45 and 0.5 < final["test_auc"] <= 1 and 0 <= final["test_acc"] <= 1
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[-1]["bytes_cum"] == 4 * lines[0]["bytes"] > 0
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["telecom.0.weight"].shape == (5, 2) and saved["telecom.2.weight"].shape == (4, 5)
    assert saved["telecom.4.weight"].shape == (3, 4) and saved["bank.bottom.0.weight"].shape == (3, 3)
    assert saved["bank.top.0.weight"].shape == (4, 6)
    assert config.load(out / "config.toml") == config.load(toml(tmp_path, psi=True, noise=0.01,
                                                                    bottom={"telecom": [5, 4]}))


@pytest.mark.parametrize("use_psi", [False, True])
def test_simulation_equals_the_deployed_code_in_one_process(tmp_path, use_psi):
    """The simulation aligns by PSI and trains with the deployed path's own code: its losses equal
    ``deploy.vertical.train`` on the same configuration with the aligned ids given, bit for bit."""
    common = tables(tmp_path)
    settings, parties = build(config.load(toml(tmp_path, psi=use_psi)))
    got = experiment.run(settings, parties, tmp_path / "run")
    head = '[vertical]\nids = "common.txt"\ncut = 3\nseed = 7\nlr = 0.05\nbatch = 20\nepochs = 4\n'
    (tmp_path / "b.toml").write_text(head + 'data = "bank.csv"\nname = "bank"\nlabel = "default"\n'
                                     'parties = ["telecom"]\nhidden = [4]\n')
    (tmp_path / "t.toml").write_text(head + 'data = "tel.csv"\nname = "telecom"\n')
    cfg = deployed.load(tmp_path / "b.toml")
    x, y, digest = deployed.table(cfg)
    channel = Channel()
    channel.attach("telecom", deployed.FeatureEndpoint(deployed.load(tmp_path / "t.toml")))
    want = deployed.train(cfg, channel, x, y, digest)
    assert experiment.align(parties, "bank", use_psi) == sorted(common)
    assert got["losses"] == want["losses"] and len(want["losses"]) == 24
    assert got["test_auc"] == want["auc"] and got["test_acc"] == want["accuracy"]


def test_bottom_and_top_shapes_are_what_the_config_asks(tmp_path):
    tables(tmp_path)
    settings, parties = build(config.load(toml(tmp_path, bottom={"bank": [7], "telecom": [6, 5]}, hidden=[9, 8])))
    s = experiment.Setup(settings, parties)
    shapes = lambda m: [tuple(p.shape) for p in m.parameters() if p.dim() == 2]  # noqa: E731
    assert shapes(s.run.modules["bottom"]) == [(7, 3), (3, 7)]
    assert shapes(s.endpoints["telecom"].inner.model) == [(6, 2), (5, 6), (3, 5)]
    assert shapes(s.run.modules["top"]) == [(9, 6), (8, 9), (1, 8)]
    settings, parties = build(config.load(toml(tmp_path, bottom=[2])))  # one list: every party
    s = experiment.Setup(settings, parties)
    assert shapes(s.endpoints["telecom"].inner.model) == [(2, 2), (3, 2)]
    assert shapes(s.run.modules["bottom"]) == [(2, 3), (3, 2)]


def _killed_at(monkeypatch, steps: int):
    """Make the label party's driver die at its ``steps``-th step (a process killed mid-epoch)."""
    real, count = LabelRun.step, [0]

    def step(self, rows):
        count[0] += 1
        if count[0] == steps:
            raise KeyboardInterrupt("killed")
        return real(self, rows)
    monkeypatch.setattr(LabelRun, "step", step)


@pytest.mark.parametrize("kill_at", [15, 7])  # mid-epoch 3, mid-epoch 2
def test_a_killed_run_resumes_to_the_uninterrupted_loss_trajectory(tmp_path, monkeypatch, kill_at):
    """Adam, gradient noise (its generator's state is checkpointed), per-party bottom widths."""
    tables(tmp_path)
    path = toml(tmp_path, noise=0.05, optimizer="adam", bottom={"telecom": [4]})
    assert main(["run", str(path), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    _killed_at(monkeypatch, kill_at)
    with pytest.raises(KeyboardInterrupt):
        main(["run", str(path), "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    done = len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())
    assert done == (kill_at - 1) // 6  # the epochs finished before the kill
    assert main(["run", "--resume", str(tmp_path / "cut")]) == 0
    a, b = (json.loads((tmp_path / d / "final.json").read_text()) for d in ("whole", "cut"))
    assert a["losses"] == b["losses"] and len(a["losses"]) == 24  # float64, exactly
    assert (tmp_path / "whole" / "metrics.jsonl").read_bytes() == (tmp_path / "cut" / "metrics.jsonl").read_bytes()
    ma, mb = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("whole", "cut"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.slow
def test_a_killed_hetero_lr_run_resumes_to_the_uninterrupted_losses(tmp_path, monkeypatch):
    """Hetero LR: a fresh Paillier key after the resume; the losses are exact all the same (the
    masks cancel mod n, the fixed-point rounding does not depend on the key)."""
    pytest.importorskip("phe")
    tables(tmp_path, n=60)
    path = toml(tmp_path, protocol="hetero_lr", key_bits=1024, epochs=3, batch=14, lr=0.5, hidden=[16], cut=8)
    assert main(["run", str(path), "--out", str(tmp_path / "whole")]) == 0
    _killed_at(monkeypatch, 8)  # 42 train rows, 3 steps per epoch: mid-epoch 3
    with pytest.raises(KeyboardInterrupt):
        main(["run", str(path), "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    assert main(["run", "--resume", str(tmp_path / "cut")]) == 0
    a, b = (json.loads((tmp_path / d / "final.json").read_text()) for d in ("whole", "cut"))
    assert a["losses"] == b["losses"] and len(a["losses"]) == 9 and a["test_auc"] == b["test_auc"]


def test_deployed_parties_read_their_own_bottom_widths_and_the_noise_is_secret(tmp_path):
    """Deployed, each party's TOML sets its own bottom widths; the label party's gradient noise
    comes from a secret seed (two runs differ), where the simulation's comes from the run's seed."""
    tables(tmp_path)
    head = '[vertical]\nids = "common.txt"\ncut = 3\nseed = 7\nlr = 0.05\nbatch = 20\nepochs = 1\n'
    (tmp_path / "b.toml").write_text(head + 'data = "bank.csv"\nname = "bank"\nlabel = "default"\n'
                                     'parties = ["telecom"]\nhidden = [4]\nnoise = 0.05\nbottom = [2]\n')
    (tmp_path / "t.toml").write_text(head + 'data = "tel.csv"\nname = "telecom"\nbottom = {telecom = [6, 5]}\n')
    cfg = deployed.load(tmp_path / "b.toml")
    x, y, digest = deployed.table(cfg)
    runs = []
    for _ in range(2):
        channel, tel = Channel(), deployed.FeatureEndpoint(deployed.load(tmp_path / "t.toml"))
        channel.attach("telecom", tel)
        runs.append(deployed.train(cfg, channel, x, y, digest))
    assert [tuple(p.shape) for p in tel.inner.model.parameters() if p.dim() == 2] == [(6, 2), (5, 6), (3, 5)]
    assert runs[0]["state"]["bottom.0.weight"].shape == (2, 3)
    assert runs[0]["losses"][0] == runs[1]["losses"][0] and runs[0]["losses"][1:] != runs[1]["losses"][1:]


@pytest.mark.slow
def test_a_run_killed_by_sigkill_resumes_to_the_uninterrupted_losses(tmp_path):
    """The real thing: `atoll run` killed with SIGKILL mid-run (possibly mid-write), then
    `atoll run --resume`: final losses and metrics.jsonl equal an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import atoll
    env = {"PYTHONPATH": str(Path(atoll.__file__).resolve().parents[1]), "PATH": os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "1"}
    tables(tmp_path)
    path = toml(tmp_path, epochs=150, noise=0.02, bottom=[4])
    cmd = [sys.executable, "-m", "atoll.cli", "run"]
    subprocess.run(cmd + [str(path), "--out", str(tmp_path / "whole")], env=env, check=True, timeout=600)
    proc = subprocess.Popen(cmd + [str(path), "--out", str(tmp_path / "cut")], env=env)
    log, end = tmp_path / "cut" / "metrics.jsonl", time.monotonic() + 300
    while not (log.exists() and log.read_text().count("\n") >= 3) and time.monotonic() < end:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    killed_at = log.read_text().count("\n")
    assert 3 <= killed_at < 150 and not (tmp_path / "cut" / "final.json").exists()
    subprocess.run(cmd + ["--resume", str(tmp_path / "cut")], env=env, check=True, timeout=600)
    a, b = (json.loads((tmp_path / d / "final.json").read_text()) for d in ("whole", "cut"))
    assert a["losses"] == b["losses"] and len(a["losses"]) == 150 * 6
    assert log.read_bytes() == (tmp_path / "whole" / "metrics.jsonl").read_bytes()


def test_lazy_epochs_draw_the_batches_of_split_batches():
    from atoll.vertical.protocol import epochs
    from atoll.vertical.split import batches
    train = torch.randperm(103, generator=torch.Generator().manual_seed(1))
    cfg = {"seed": 5, "epochs": 4, "batch": 10}
    got = [rows for epoch in epochs(cfg, train) for rows in epoch]
    want = [train[b] for b in batches(103, 10, 4, 5)]
    assert len(got) == len(want) == 44 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_compare_of_vertical_runs_is_in_epochs_and_refuses_a_horizontal_one(tmp_path):
    """`atoll compare` on vertical run folders: its table counts epochs and the bytes between the
    parties to the target (no rounds, no uplink/downlink); mixing in a horizontal run is refused."""
    from atoll.report import compare
    tables(tmp_path)
    runs = []
    for lr in (0.05, 0.5):
        runs.append(tmp_path / f"run{lr}")
        assert main(["run", str(toml(tmp_path, epochs=5, lr=lr)), "--out", str(runs[-1]), "--quiet"]) == 0
    metrics = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    target = min(m[-1]["test_acc"] for m in metrics)
    rows = compare(runs, tmp_path / "cmp", labels=["slow", "fast"], target_acc=target)
    for row, m in zip(rows, metrics):
        first = next(r for r in m if r["test_acc"] >= target)
        assert row["final_acc"] == m[-1]["test_acc"] and row["best_acc"] == max(r["test_acc"] for r in m)
        assert row["epoch_to_target"] == first["epoch"] and row["bytes_cum_to_target"] == first["bytes_cum"]
        assert not any(k.startswith(("round", "bytes_up", "bytes_down")) for k in row)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "epoch_to_target" in md and "round" not in md
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "metrics.jsonl").write_text('{"round": 1, "test_acc": 0.5}\n')
    with pytest.raises(ValueError, match=r"one kind only.*vertical.*run0\.05.*horizontal.*'[^']*h'"):
        compare([runs[0], tmp_path / "h"], tmp_path / "cmp2")
    assert not (tmp_path / "cmp2").exists()


def test_report_of_a_vertical_run_speaks_of_epochs_steps_and_parties(tmp_path):
    """`atoll report` on a vertical run folder: epochs (not rounds), steps, held-out AUC, the bytes
    between the parties; no per-client or uplink/downlink figures, which a vertical run has not."""
    from atoll.report import report
    tables(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(toml(tmp_path, epochs=5)), "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / "final.json").read_text())
    n = report(out)
    best = max(rows, key=lambda r: r["test_acc"])
    assert n["epochs"] == len(rows) == 5 and n["steps"] == len(final["losses"]) == 5 * 6
    assert n["final_test_auc"] == final["test_auc"] and n["final_test_acc"] == final["test_acc"]
    assert (n["best_test_acc"], n["best_epoch"]) == (best["test_acc"], best["epoch"])
    assert n["bytes_total"] == rows[-1]["bytes_cum"] > 0
    assert "rounds" not in n and "bytes_up_total" not in n and "fed_acc_mean" not in n
    text = (out / "summary.md").read_text()
    head = text.split("<details>")[0]  # the config copy below may say anything
    assert "vertical split between bank, telecom, 5 epochs (30 steps)." in head
    assert f"| final held-out AUC | {final['test_auc']:.4g} |" in head
    assert f"(epoch {best['epoch']})" in head and f"| {rows[-1]['bytes_cum'] / 1e6:.3f} |" in head
    assert not any(w in head.lower() for w in ("round", "client", "uplink", "up / down"))
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["bytes.png", "epochs.png"]
