"""`atoll vertical serve` / `atoll vertical connect` between two processes over TLS with tokens:
the losses equal the same configuration trained in one process (``deploy.vertical.train`` over a
local ``Channel``) bit for bit; a feature party killed mid-run ends the label party's run with a
named error and its model written as of the last complete step."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import atoll
from atoll.deploy import certs, vertical
from atoll.vertical.channel import Channel, PartyError

SRC = str(Path(atoll.__file__).resolve().parents[1])
ENV = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def setup(tmp, epochs=3, protocol="split"):
    rng = np.random.default_rng(0)
    n = 120
    xb, xt = rng.normal(size=(n, 3)), rng.normal(size=(n, 2))
    y = (xb[:, 0] + xt[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(int)
    ids = [f"c{i:03d}" for i in range(n)]
    order = rng.permutation(n)  # the telecom's table is in its own order, with extra rows
    (tmp / "bank.csv").write_text("id,a,b,c,default\n" + "".join(
        f"{ids[i]},{float(xb[i, 0])!r},{float(xb[i, 1])!r},{float(xb[i, 2])!r},{y[i]}\n" for i in range(n)))
    (tmp / "tel.csv").write_text("id,u,v\n" + "".join(
        f"{ids[i]},{float(xt[i, 0])!r},{float(xt[i, 1])!r}\n" for i in order) + "zzz,1.0,2.0\n")
    (tmp / "common.txt").write_text("\n".join(ids[:100]) + "\n")
    common = f'protocol = "{protocol}"\nids = "common.txt"\ncut = 3\nseed = 7\nlr = 0.05\nkey_bits = 1024\n'
    (tmp / "bank.toml").write_text(f'[vertical]\n{common}data = "bank.csv"\nname = "bank"\n'
                                   f'label = "default"\nparties = ["telecom"]\nbatch = 20\n'
                                   f'epochs = {epochs}\nhidden = [4]\ntimeout = 20\n')
    (tmp / "tel.toml").write_text(f'[vertical]\n{common}data = "tel.csv"\nname = "telecom"\n')
    certs.init(tmp / "certs")
    return certs.issue(tmp / "certs", "telecom", token=True)["token"]


def start(tmp, args, log):
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "atoll.cli", "vertical", *args], cwd=tmp,
                                stdout=out, stderr=subprocess.STDOUT, env=ENV)


def port(proc, log):
    end = time.monotonic() + 60
    while not (m := re.search(r"listening on port (\d+)", log.read_text())):
        assert proc.poll() is None and time.monotonic() < end, log.read_text()
        time.sleep(0.05)
    return m.group(1)


def in_process(tmp):
    """The same configuration trained in one process: the telecom's endpoint on a local Channel."""
    cfg = vertical.load(tmp / "bank.toml")
    x, y, digest = vertical.table(cfg)
    channel = Channel()
    channel.attach("telecom", vertical.FeatureEndpoint(vertical.load(tmp / "tel.toml")))
    return vertical.train(cfg, channel, x, y, digest)


@pytest.mark.parametrize("protocol", ["split", pytest.param("hetero_lr", marks=pytest.mark.slow)])
def test_serve_and_connect_equal_the_in_process_run_bit_for_bit(tmp_path, protocol):
    if protocol == "hetero_lr":
        pytest.importorskip("phe")
    token = setup(tmp_path, protocol=protocol)
    log = tmp_path / "serve.log"
    proc = start(tmp_path, ["serve", "bank.toml", "--out", "bank.json", "--model", "bank.pt"], log)
    try:
        p = port(proc, log)
        conn = subprocess.run([sys.executable, "-m", "atoll.cli", "vertical", "connect", f"localhost:{p}",
                               "tel.toml", "--ca", "certs/ca.pem", "--token-file", token,
                               "--model", "tel.pt"], cwd=tmp_path, env=ENV, capture_output=True, timeout=300)
        assert conn.returncode == 0, conn.stdout + conn.stderr
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    got = json.loads((tmp_path / "bank.json").read_text())
    want = in_process(tmp_path)
    assert got["steps"] == want["steps"] == 3 * 4 and "error" not in got
    assert got["losses"] == want["losses"]  # bit for bit
    assert got["auc"] == want["auc"] and got["auc"] > 0.75
    assert got["bytes_per_step"] == want["bytes_per_step"]
    saved = torch.load(tmp_path / "bank.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in want["state"].items())
    assert json.loads(conn.stdout.decode().strip().splitlines()[-1])["steps"] == 12


def test_a_killed_feature_party_ends_the_run_named_with_the_last_complete_step_saved(tmp_path):
    token = setup(tmp_path, epochs=2000)
    log, tlog = tmp_path / "serve.log", tmp_path / "tel.log"
    proc = start(tmp_path, ["serve", "bank.toml", "--out", "bank.json", "--model", "bank.pt",
                            "--every", "10"], log)
    tel = None
    try:
        p = port(proc, log)
        tel = start(tmp_path, ["connect", f"localhost:{p}", "tel.toml", "--ca", "certs/ca.pem",
                               "--token-file", token], tlog)
        end = time.monotonic() + 60
        while '"step": 30,' not in log.read_text():  # mid-run: 30 steps done
            assert proc.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.05)
        tel.send_signal(signal.SIGKILL)
        tel.wait(10)
        assert proc.wait(60) == 1, log.read_text()
    finally:
        for q in (proc, tel):
            if q is not None and q.poll() is None:
                q.kill()
                q.wait()
    got = json.loads((tmp_path / "bank.json").read_text())
    # "broke (reason)" when gRPC reports the dead peer, "closed" when its server ends the stream quietly
    assert re.fullmatch(r"party 'telecom': the connection (closed|broke \(.*\)) during step \d+ "
                        r"\(field '\w+'\)", got["error"]), got["error"]
    k = got["steps"]
    assert 0 < k < 2000 * 4
    cfg, tel_cfg = vertical.load(tmp_path / "bank.toml"), vertical.load(tmp_path / "tel.toml")
    x, y, digest = vertical.table(cfg)
    cfg["epochs"] = -(-k // 4)  # enough epochs, the batches are the same prefix
    channel = Channel()
    endpoint = vertical.FeatureEndpoint(tel_cfg)
    channel.attach("telecom", endpoint)
    calls = {"n": 0}
    inner_on = endpoint.on

    def on(name, msg, sender):  # the telecom stops answering at step k + 1, as the killed one did
        calls["n"] += name == "rows"
        if calls["n"] > k:
            raise PartyError("gone")
        return inner_on(name, msg, sender)
    endpoint.on = on
    ref = vertical.train(cfg, channel, x, y, digest)
    assert ref["steps"] == k and ref["losses"] == got["losses"]
    saved = torch.load(tmp_path / "bank.pt", weights_only=True)
    assert all(torch.equal(saved[key], v) for key, v in ref["state"].items())


def test_parties_that_disagree_on_the_aligned_ids_or_the_config_stop_at_the_hello(tmp_path):
    setup(tmp_path)
    cfg = vertical.load(tmp_path / "bank.toml")
    x, y, digest = vertical.table(cfg)
    (tmp_path / "other.txt").write_text("\n".join(f"c{i:03d}" for i in range(1, 101)) + "\n")
    for change in ({"ids": str(tmp_path / "other.txt")}, {"cut": 4}, {"protocol": "hetero_lr"}):
        channel = Channel()
        channel.attach("telecom", vertical.FeatureEndpoint(vertical.load(tmp_path / "tel.toml") | change))
        with pytest.raises(PartyError, match="party 'bank': field 'hello' disagrees"):
            vertical.train(cfg, channel, x, y, digest)
    with pytest.raises(ValueError, match=r"unknown key 'vertical.epoch'; did you mean 'vertical.epochs'"):
        (tmp_path / "bad.toml").write_text("[vertical]\nepoch = 3\n")
        vertical.load(tmp_path / "bad.toml")
