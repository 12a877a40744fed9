"""Peers over gRPC with TLS on loopback (docs/decentralized.md, "Peers over gRPC").

``--peers`` peers as threads of this process, each a gRPC server with TLS and token
authentication, run ``--rounds`` rounds of gossip on a ring (Metropolis weights) and of push-sum
on a directed ring over float64 vectors of ``--d`` values, then compare with the simulation
(``decentralized.gossip`` / ``push_sum``).

    PYTHONPATH=src python bench/decentralized_grpc.py --peers 16 --d 100000 --rounds 10

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

from atoll import decentralized as D, peers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--d", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
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
