"""Distributed DP under SecAgg+ (the Skellam mechanism): accuracy against epsilon and ring bits.

    PYTHONPATH=src .venv/bin/python bench/secure_distributed.py [--rounds 30] [--seeds 0 1 2 3 4]
                                                               [--only "eps 8"]

Setup: digits, 20 clients (Dirichlet 0.5 labels), all 20 in every round, SecAgg+ with 8
neighbours, logistic regression, 5 local SGD steps of lr 0.1, L2 clip 0.5, float64, RDP
accountant, add/remove one client, delta = 1e-5, no amplification by sampling claimed. Each
client adds Skellam noise to its rounded update; the server sees only the noisy sum. The
central rows: DP-FedAvg with every client in every round (rate 1, so no amplification either),
the same clip and epsilon, noise added by a server that sees every update. Prints
final test accuracy, epsilon, the calibrated noise multiplier, the scale (integer units per
unit of update) and the ring bits per row.
"""
from __future__ import annotations

import argparse
import logging
import statistics

from atoll import config
from atoll.simulation import simulate

logging.getLogger("atoll").setLevel(logging.ERROR)

BASE = """
rounds = {rounds}
seed = 0
dtype = "float64"
[data]
name = "digits"
num_clients = 20
partition = "dirichlet"
alpha = 0.5
[model]
name = "logreg"
[client]
lr = 0.1
steps = 5
[secure]
method = "secagg+"
neighbours = 8
[eval]
federated = false
"""
DP = ["privacy.mode=distributed", "privacy.accountant=rdp", "privacy.clip=0.5"]
CENTRAL = ["secure.method=none", "privacy.mode=dp_fedavg", "privacy.accountant=rdp", "privacy.clip=0.5",
           "privacy.target_epsilon=8", "sampling.method=poisson", "sampling.rate=1.0"]
RUNS = {
    "secagg+, no DP": [],
    "secagg+, distributed, eps 8, 16 bits": DP + ["privacy.target_epsilon=8"],
    "secagg+, distributed, eps 8, 10 bits": DP + ["privacy.target_epsilon=8", "secure.bits=10"],
    "secagg+, distributed, eps 2, 16 bits": DP + ["privacy.target_epsilon=2"],
    "secagg+, distributed, eps 8, 16 bits, 100 clients": DP + [
        "privacy.target_epsilon=8", "data.num_clients=100", "secure.neighbours=20"],
    "central dp_fedavg (trusted server), eps 8": CENTRAL,
    "central dp_fedavg (trusted server), eps 8, 100 clients": CENTRAL + ["data.num_clients=100"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="run seeds (data split, sampling, noise); accuracy is their mean and std")
    ap.add_argument("--only", nargs="*", default=None, help="run names containing any of these words")
    args = ap.parse_args()
    print("| run | accuracy (mean ± std over seeds) | epsilon | noise multiplier | scale | ring bits |\n"
          "|---|---|---|---|---|---|")
    for name, over in RUNS.items():
        if args.only and not any(w in name for w in args.only):
            continue
        accs = []
        for seed in args.seeds:
            cfg = config.load(text=BASE.format(rounds=args.rounds), overrides=over + [f"seed={seed}"])
            res = simulate(*config.build(cfg), plots=False)
            accs.append(res.final["test_acc"])
        det = res.final.get("privacy", {})
        eps = res.metrics[-1].get("epsilon")
        spread = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
        print(f"| {name} | {statistics.mean(accs):.4f}{spread} | {'-' if eps is None else f'{eps:.3f}'} | "
              f"{det.get('noise_multiplier', 0):.3f} | {det.get('scale', 0):.1f} | "
              f"{res.metrics[-1].get('secure_bits')} |", flush=True)


if __name__ == "__main__":
    main()
