"""Seed 004's per-client downlink deployed on loopback: bytes on the wire against the simulation.

One in-process server (TLS, tokens) and one in-process client thread per enrolled client run the
config below; the same config then runs in simulation (``LoopRuntime``), and once more with the
dense broadcast (``comm.downlink = "model"``) for comparison.

    PYTHONPATH=src python bench/deploy_tracker.py [--anchor-every A] [--base client|initial]

Prints one JSON object; docs/communication.md ("In deployment") quotes it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

CONFIG = """
name = "deploy-tracker"
rounds = {rounds}
[data]
name = "digits"
num_clients = {clients}
[model]
hidden = [64]
[client]
batch_size = 32
[sampling]
clients_per_round = {per_round}
[comm]
server_topk = 0.05
downlink = "{base}"
anchor_every = {anchor}
[deploy]
round_timeout = 60
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--base", default="client", choices=["client", "initial"])
    ap.add_argument("--anchor-every", type=int, default=0)
    a = ap.parse_args()

    from atoll import config
    from atoll.deploy import local
    from atoll.deploy.client import Client
    from atoll.deploy.server import Server
    from atoll.runtime.loop import LoopRuntime
    from atoll.simulation import simulate

    tmp = Path(tempfile.mkdtemp(prefix="atoll-tracker-"))
    text = CONFIG.format(rounds=a.rounds, clients=a.clients, per_round=a.per_round, base=a.base,
                         anchor=a.anchor_every)
    (tmp / "exp.toml").write_text(text)
    cfg = config.load(tmp / "exp.toml")
    enrolled = local.prepare(cfg, tmp, tokens=True)
    server = Server(cfg, run_dir=tmp / "run", certs_dir=tmp / "certs", host="localhost", port=0,
                    auth="token", plots=False, linger_s=0.5)
    t0 = time.perf_counter()
    st = threading.Thread(target=server.run, daemon=True)
    st.start()
    clients = [Client(f"localhost:{server.port}", e["data"], ca=e["ca"], token=e["token"],
                      backoff=(0.1, 1.0), poll_s=2.0, give_up_s=60) for e in enrolled]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for c, t in zip(clients, threads):  # one at a time: model building uses torch's global RNG
        t.start()
        while c.run_id is None:
            time.sleep(0.01)
    st.join()
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    sim = simulate(*config.build(cfg), runtime=LoopRuntime())
    dense_cfg = config.load(tmp / "exp.toml", overrides=["comm.downlink=model", "comm.anchor_every=0"])
    dense = simulate(*config.build(dense_cfg), runtime=LoopRuntime())
    got = [m["bytes_down"] for m in lines]
    want = [m["bytes_down"] for m in sim.metrics]
    mine = server.coordinator.state.params
    diff = max(float((mine[k] - v).abs().max()) for k, v in sim.state.params.items())
    print(json.dumps({
        "config": {"rounds": a.rounds, "clients": a.clients, "per_round": a.per_round, "base": a.base,
                   "anchor_every": a.anchor_every, "server_topk": 0.05, "model": "digits MLP 64-64-10"},
        "bytes_down_deployed": got, "bytes_down_simulated": want, "equal": got == want,
        "deployed_total": sum(got), "dense_broadcast_total": sum(m["bytes_down"] for m in dense.metrics),
        "refused": sum(c.counts["refused"] for c in clients), "max_abs_param_diff": diff,
        "deployed_wall_s": round(wall, 2)}, indent=1))


if __name__ == "__main__":
    main()
