"""Peers over gRPC with TLS on loopback (docs/decentralized.md, "Peers over gRPC").

``--peers`` peers as threads of this process, each a gRPC server with TLS and token
authentication, run ``--rounds`` rounds of gossip on a ring (Metropolis weights) and of push-sum
on a directed ring over float64 vectors of ``--d`` values, then compare with the simulation
(``decentralized.gossip`` / ``push_sum``).

    PYTHONPATH=src python bench/decentralized_grpc.py --peers 16 --d 100000 --rounds 10
    PYTHONPATH=src python bench/decentralized_grpc.py --dpsgd 300

``--dpsgd R`` instead trains digits (16 peers, MLP(32), float64, one SGD step of batch 32 per
round, lr 0.1) with D-PSGD over the peers for R rounds on the ring, and compares the test
accuracy of the peers' average model with ``decentralized.dpsgd``'s.

Prints one JSON line per protocol: wall seconds per round (median over rounds, the slowest peer
of each round), payload bytes sent per node per round (wire messages; gRPC/TLS framing not
counted) against degree x d x 8, and the largest difference from the simulation.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from atoll import config, decentralized as D, peers

DIGITS = """
seed = 0
rounds = 1
dtype = "float64"
[data]
name = "digits"
num_clients = 16
client_test_fraction = 0.0
[model]
name = "mlp"
hidden = [32]
"""


def dpsgd(rounds: int) -> None:
    _, model, fed, _ = config.build(config.load(text=DIGITS))
    w, kw = D.static(D.ring(16)), dict(lr=0.1, batch_size=32, local_steps=1, seed=0)
    acc = lambda p: float((torch.func.functional_call(model, p, (fed.x_test,)).argmax(1)  # noqa: E731
                           == fed.y_test).double().mean())
    start = time.perf_counter()
    ref = D.dpsgd(model, fed, w, rounds, **kw)
    sim_s = time.perf_counter() - start
    base = {k: v.detach() for k, v in model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out, ps = peers.run([base] * 16, w, rounds, creds=peers.enrol(tmp, 16),
                            local=[peers.dpsgd_step(model, fed, i, **kw) for i in range(16)])
        wall = time.perf_counter() - start
    avg = {k: torch.stack([o[k] for o in out]).mean(0) for k in ref}
    print(json.dumps({"protocol": "D-PSGD ring, digits", "peers": 16, "rounds": rounds,
                      "test_acc_peers": round(acc(avg), 4), "test_acc_simulation": round(acc(ref), 4),
                      "max_abs_diff_vs_simulation": max(float((avg[k] - ref[k]).abs().max()) for k in ref),
                      "wall_s": round(wall, 1), "simulation_s": round(sim_s, 1),
                      "bytes_per_node_per_round": statistics.mean(s for p in ps for s in p.sent),
                      "load_avg_1m": os.getloadavg()[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--d", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dpsgd", type=int, default=0, metavar="ROUNDS")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.dpsgd:
        return dpsgd(args.dpsgd)
    n, d = args.peers, args.d
    x = torch.tensor(np.random.default_rng(0).normal(size=(n, d)))
    with tempfile.TemporaryDirectory() as tmp:
        creds = peers.enrol(tmp, n)
        for name, w, push in (("gossip ring", D.ring(n), False),
                              ("push-sum directed ring", D.directed_ring(n), True)):
            start = time.perf_counter()
            out, ps = peers.run([{"x": x[i]} for i in range(n)], D.static(w), args.rounds,
                                creds=creds, push=push, round_timeout=60.0)
            total = time.perf_counter() - start
            got = torch.stack([o["x"] for o in out])
            ref = (D.push_sum if push else D.gossip)(x, D.static(w), args.rounds)
            per_round = [max(p.seconds[r] for p in ps) for r in range(args.rounds)]
            deg = int(D.out_degree(w).max())
            print(json.dumps({
                "protocol": name, "peers": n, "d": d, "rounds": args.rounds,
                "round_s_median": round(statistics.median(per_round), 4),
                "total_s": round(total, 2),
                "bytes_per_node_per_round": statistics.mean(s for p in ps for s in p.sent),
                "degree_x_d_x_8": deg * d * 8,
                "max_abs_diff_vs_simulation": float((got - ref).abs().max()),
                "bit_for_bit": bool(torch.equal(got, ref)),
                "refused": sum(len(p.inbox.refused) for p in ps),
                "load_avg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
