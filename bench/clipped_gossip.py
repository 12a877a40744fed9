"""ClippedGossip against lying nodes: gossip averaging on a random 4-regular graph of 16 nodes,
values N(0, 1) in 5 dimensions; the liars hold ``value`` before every exchange. Prints, after
``rounds`` rounds, the honest nodes' largest distance from their own starting average (the
error) and from each other (the spread), for plain gossip and ClippedGossip with b = 1, 2.

    PYTHONPATH=src python bench/clipped_gossip.py [--rounds 100]
"""
import argparse

import numpy as np
import torch

from atoll import decentralized as D


def run(x0, w, rounds, liars, value, b):
    x = x0.clone()
    for _ in range(rounds):
        x[liars] = value
        x = D.gossip(x, D.static(w), 1, byzantine=b)
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100)
    a = ap.parse_args()
    n, w = 16, D.random_regular(16, 4, seed=1)
    x0 = torch.tensor(np.random.default_rng(0).normal(size=(n, 5)))
    start = float((x0 - x0.mean(0)).norm(dim=1).max())
    print(f"{a.rounds} rounds, 16 nodes, 4-regular; at the start the largest distance from the average is {start:.3g}")
    print("| liars | value | rule | error | spread |")
    print("|---|---|---|---|---|")
    for liars, value in (([], 0.0), ([3], 1e6), ([3], 10.0), ([3, 9], 1e6)):
        honest = [i for i in range(n) if i not in liars]
        centre = x0[honest].mean(0)
        for b in (None, 1, 2):
            x = run(x0, w, a.rounds, liars, value, b)[honest]
            err = float((x - centre).norm(dim=1).max())
            spread = float((x - x.mean(0)).norm(dim=1).max())
            rule = "gossip" if b is None else f"clipped b={b}"
            print(f"| {liars or '-'} | {value:g} | {rule} | {err:.3g} | {spread:.3g} |")


if __name__ == "__main__":
    main()
