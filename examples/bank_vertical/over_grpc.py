"""The bank example between two processes over gRPC with TLS and a token: PSI, then training.

Writes each party's table and ids (``generate`` of bank_vertical.py), then runs the commands a
bank and a telecom would run on their own machines (printed as they run), here on loopback:

    atoll certs init --dir certs --host localhost            # the bank's authority
    atoll certs client telecom --token --dir certs           # the telecom's token
    atoll psi serve bank_ids.txt --certs certs --out common.txt                  # bank
    atoll psi connect localhost:PORT telecom_ids.txt --ca certs/ca.pem \\
          --token-file certs/clients/telecom.token --out common.txt                      # telecom
    atoll vertical serve bank.toml --certs certs --out bank.json                 # bank (labels)
    atoll vertical connect localhost:PORT telecom.toml --ca certs/ca.pem \\
          --token-file certs/clients/telecom.token                                      # telecom

and checks that the losses equal the same configuration trained in one process.

    PYTHONPATH=src python examples/bank_vertical/over_grpc.py [--dir DIR] [--hetero]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import atoll
from atoll.deploy import vertical
from atoll.vertical.bank import BANK_COLS, TELECOM_COLS, generate
from atoll.vertical.channel import Channel

SRC = str(Path(atoll.__file__).resolve().parents[1])  # the parties run this checkout's atoll
COMMON = {"split": 'cut = 8\nhidden = [16]\nlr = 0.01\nbatch = 128\nepochs = 15\n',
          "hetero_lr": 'lr = 0.5\nbatch = 256\nepochs = 2\nkey_bits = 1024\n'}


def write_party_files(d: Path, people: int, seed: int, protocol: str) -> None:
    bank, telecom = generate(people, seed)
    rows = lambda ids, x, extra=None: "".join(  # noqa: E731
        f"{i}," + ",".join(repr(float(v)) for v in r) + (f",{int(extra[k])}" if extra is not None else "") + "\n"
        for k, (i, r) in enumerate(zip(ids, x)))
    (d / "bank.csv").write_text("id," + ",".join(BANK_COLS) + ",default\n" + rows(bank["ids"], bank["x"], bank["default"]))
    (d / "telecom.csv").write_text("id," + ",".join(TELECOM_COLS) + "\n" + rows(telecom["ids"], telecom["x"]))
    (d / "bank_ids.txt").write_text("\n".join(bank["ids"]) + "\n")
    (d / "telecom_ids.txt").write_text("\n".join(telecom["ids"]) + "\n")
    head = f'[vertical]\nprotocol = "{protocol}"\nids = "common.txt"\nseed = {seed}\n{COMMON[protocol]}'
    (d / "bank.toml").write_text(head + 'name = "bank"\ndata = "bank.csv"\nlabel = "default"\n'
                                 'parties = ["telecom"]\nholdout = 0.3\n')
    (d / "telecom.toml").write_text(head + 'name = "telecom"\ndata = "telecom.csv"\n')


def atoll(d: Path, *args, background=False, log=None):
    print("$ atoll " + " ".join(args), flush=True)
    cmd = [sys.executable, "-m", "atoll.cli", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    if background:
        return subprocess.Popen(cmd, cwd=d, env=env, stdout=open(d / log, "wb"), stderr=subprocess.STDOUT)
    out = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stdout + out.stderr)
    return out.stdout


def pair(d: Path, serve: list, connect: list, log: str):
    """Run the listening side in the background and the dialing side; both outputs."""
    proc = atoll(d, *serve, background=True, log=log)
    try:
        end = time.monotonic() + 120
        while not (m := re.search(r"listening on port (\d+)", (d / log).read_text())):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError((d / log).read_text())
            time.sleep(0.1)
        dialled = atoll(d, *[a.replace("PORT", m.group(1)) for a in connect])
        if proc.wait(600):
            raise RuntimeError((d / log).read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return (d / log).read_text(), dialled


def main(d: Path, people: int, seed: int, protocol: str) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    write_party_files(d, people, seed, protocol)
    if not (d / "certs" / "ca.pem").exists():
        atoll(d, "certs", "init", "--dir", "certs", "--host", "localhost")
        atoll(d, "certs", "client", "telecom", "--token", "--dir", "certs")
    token = ["--ca", "certs/ca.pem", "--token-file", "certs/clients/telecom.token"]
    t0 = time.perf_counter()
    pair(d, ["psi", "serve", "bank_ids.txt", "--certs", "certs", "--out", "common.txt"],
         ["psi", "connect", "localhost:PORT", "telecom_ids.txt", *token, "--out", "common.txt"], "psi.log")
    psi_s = time.perf_counter() - t0
    pair(d, ["vertical", "serve", "bank.toml", "--certs", "certs", "--out", "bank.json"],
         ["vertical", "connect", "localhost:PORT", "telecom.toml", *token], "vertical.log")
    got = json.loads((d / "bank.json").read_text())
    cfg = vertical.load(d / "bank.toml")
    x, y, digest = vertical.table(cfg)
    channel = Channel()
    channel.attach("telecom", vertical.FeatureEndpoint(vertical.load(d / "telecom.toml")))
    local = vertical.train(cfg, channel, x, y, digest)
    print(f"{protocol} over gRPC: {got['rows']} aligned rows (PSI {psi_s:.1f} s), {got['steps']} steps, "
          f"held-out AUC {got['auc']:.3f}, accuracy {got['accuracy']:.3f}, {got['seconds']:.1f} s "
          f"training ({1000 * got['seconds'] / got['steps']:.1f} ms per step), "
          f"{got['bytes_per_step']:.0f} payload bytes per step; in one process: {local['seconds']:.1f} s; "
          f"losses equal bit for bit: {got['losses'] == local['losses']}")
    return got | {"in_process": local["losses"] == got["losses"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="bank_vertical_run")
    ap.add_argument("--people", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--hetero", action="store_true", help="hetero LR (Paillier) instead of the split NN")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)  # as each party process (OMP_NUM_THREADS=1)
    main(Path(a.dir), a.people, a.seed, "hetero_lr" if a.hetero else "split")
