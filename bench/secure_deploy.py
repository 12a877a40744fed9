"""Secure aggregation in deployment: a server and n deployed clients (threads of this process)
over loopback gRPC with TLS and tokens, ``[secure]`` on; prints per stage the wall seconds,
the survivors and the largest request / answer of one client, then the crypto seconds.

    PYTHONPATH=src python bench/secure_deploy.py [--clients 8] [--rounds 3] [--method secagg+]
                                                 [--neighbours 4] [--hidden 64] [--malicious]

Figures are medians over the rounds. All parties share this machine's cores and Python's GIL,
so the wall seconds are an upper bound on what separate machines would see. The same deployment
without ``[secure]`` runs after it, in the same process, and the ratio of the median round walls
is printed (the issue's target: at most 1.3x). With ``--malicious`` the secure run has
``[secure] malicious = true`` (certificate-enrolled clients, signed keys, the consistency check)
and the run it is compared to is the same deployment in the semi-honest protocol.
"""
import argparse
import logging
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from atoll import config
from atoll.deploy import local
from atoll.deploy.client import Client
from atoll.deploy.server import Server

TOML = """
name = "secure-bench"
rounds = {rounds}
[data]
name = "digits"
num_clients = {clients}
[model]
hidden = [{hidden}]
[client]
batch_size = 32
[deploy]
round_timeout = 120
[secure]
method = "{method}"
clip = 0.5
bits = 16
stage_timeout = 60
{neighbours}"""


def deploy(text: str):
    """Run one deployment of ``text``; its metrics lines, round walls and server."""
    tmp = Path(tempfile.mkdtemp(prefix="atoll-secure-bench-"))
    (tmp / "exp.toml").write_text(text)
    cfg = config.load(tmp / "exp.toml")
    tokens = not cfg.secure.malicious  # malicious: the enrolment certificates sign the keys
    enrolled = local.prepare(cfg, tmp, tokens=tokens)
    server = Server(cfg, run_dir=tmp / "run", certs_dir=tmp / "certs", host="127.0.0.1", port=0,
                    auth="token" if tokens else "mtls", plots=False, linger_s=0.5)
    creds = (lambda e: {"token": e["token"]}) if tokens else (lambda e: {"cert": e["cert"], "key": e["key"]})
    clients = [Client(f"127.0.0.1:{server.port}", e["data"], ca=e["ca"], **creds(e),
                      backoff=(0.1, 1.0), give_up_s=60) for e in enrolled]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients + [server]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    lines = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    timings = [json.loads(ln) for ln in (tmp / "run" / "timings.jsonl").read_text().splitlines()]
    walls = [b["wall_s"] - a_["wall_s"] for a_, b in zip([{"wall_s": 0.0}] + timings, timings)]
    return lines, walls, server


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="secagg+", choices=["secagg", "secagg+"])
    ap.add_argument("--neighbours", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--malicious", action="store_true", help="[secure] malicious = true, against semi-honest")
    a = ap.parse_args()
    logging.getLogger("atoll.deploy").setLevel(logging.ERROR)  # the clients' policy notes
    text = TOML.format(rounds=a.rounds, clients=a.clients, hidden=a.hidden, method=a.method,
                       neighbours=f"neighbours = {a.neighbours}\n" if a.method == "secagg+" else "")
    t0 = time.perf_counter()
    base = text.split("[secure]")[0]  # the same deployment without [secure]: the round compared to
    if a.malicious:
        text, base = text + "malicious = true\n", text
    lines, walls, server = deploy(text)
    base_lines, plain_walls, _ = deploy(base)
    med = lambda key, i=None: statistics.median(  # noqa: E731
        ln[key] if i is None else ln[key][i] for ln in lines)
    d = sum(p.numel() for p in server.coordinator.state.params.values()) + 1
    print(f"{a.method}, n = {a.clients}, neighbours = {a.neighbours if a.method == 'secagg+' else a.clients - 1}, "
          f"d = {d}, {lines[0]['secure_bits']}-bit ring, {a.rounds} rounds, loopback TLS "
          f"({time.perf_counter() - t0:.1f} s in all)")
    print("stage       wall s   survivors   request B/client   answer B/client")
    stages = ["1 keys", "2 shares", "3 masked", "4 check", "5 unmask"] if a.malicious else \
        ["1 keys", "2 shares", "3 masked", "4 unmask"]
    for i, name in enumerate(stages):
        print(f"{name:10} {med('secure_stage_s', i):7.3f}   {med('secure_stage_survivors', i):9.0f}"
              f"   {med('secure_stage_bytes_down', i):16.0f}   {med('secure_stage_bytes_up', i):15.0f}")
    secure_s, plain_s = statistics.median(walls), statistics.median(plain_walls)
    print(f"round wall s (training + stages + server step): {secure_s:.3f}; the same deployment "
          f"{'semi-honest' if a.malicious else 'without [secure]'}: {plain_s:.3f} "
          f"(ratio {secure_s / plain_s:.2f}x)")
    print(f"crypto s: slowest client {med('secure_client_s'):.4f}, server {med('secure_server_s'):.4f}")
    if a.malicious:
        base_med = lambda key: statistics.median(ln[key] for ln in base_lines)  # noqa: E731
        print(f"semi-honest crypto s: slowest client {base_med('secure_client_s'):.4f}, "
              f"server {base_med('secure_server_s'):.4f}; bytes per client up "
              f"{sum(base_lines[0]['secure_stage_bytes_up'])}, down {sum(base_lines[0]['secure_stage_bytes_down'])}"
              f" (malicious: up {sum(lines[0]['secure_stage_bytes_up'])}, down "
              f"{sum(lines[0]['secure_stage_bytes_down'])})")
    print(f"train loss round {lines[-1]['round']}: {lines[-1]['train_loss']:.4f}, "
          f"test acc {lines[-1].get('test_acc', float('nan')):.4f}")


if __name__ == "__main__":
    main()
