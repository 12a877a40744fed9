"""Why RLR lets the backdoor through on digits: per round, the sign votes on the first-layer
weights of the four trigger features (those the trigger sets to the data's maximum), against the
votes on all coordinates. One run of the backdoor protocol of bench/robustness.py (2 attackers of
12, boost 10) under ``rlr(theta=T)+norm_bound(median)``, seed and split as given.

    PYTHONPATH=src python bench/rlr_votes.py --split dir0.1,iid --seed 0 --theta 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from atoll import config
from atoll.aggregators.robust import matrix
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

import robustness as R


def votes(split, seed, theta, rounds=40):
    rule = f"rlr(theta={theta})+norm_bound(median)"
    cfg = config.load(text=R.config_text(split, rule, 2, "backdoor", rounds, seed))
    alg, model, fed, plan = config.build(cfg)
    honest = torch.cat([c.x for c in fed.clients[:R.HONEST]])[:, -4:]
    log, agg = [], alg.aggregator

    def aggregate(decoded, weights, state):
        first = decoded[next(iter(decoded))]  # (C, hidden, features): the first layer's weights
        trig = first[..., -4:].reshape(first.shape[0], -1)
        h, a = trig[:R.HONEST].sign().sum(0), trig[R.HONEST:].sign().sum(0)
        every = matrix(decoded, weights)[0].sign().sum(0).abs()
        log.append({"honest |vote| (mean)": float(h.abs().mean()),
                    "honest zeros": float((trig[:R.HONEST] == 0).double().mean()),
                    "attackers against honest": float(((a.sign() != h.sign()) & (a != 0)).double().mean()),
                    "trigger weights flipped": float(((h + a).abs() < theta).double().mean()),
                    "all coordinates flipped": float((every < theta).double().mean())})
        return agg.aggregate(decoded, weights, state)

    alg = dataclasses.replace(alg, aggregator=dataclasses.replace(agg, aggregate=aggregate))
    simulate(alg, model, fed, plan, runtime=VmapRuntime(), plots=False)
    return honest.mean(0).tolist(), log


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="dir0.1,iid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--theta", type=int, default=3)
    a = ap.parse_args()
    for split in a.split.split(","):
        off, log = votes(split, a.seed, a.theta)
        print(f"{split}: honest mean value of the trigger features {[round(v, 3) for v in off]}")
        for i in (0, 1, 4, 9, 19, 39):
            print(f"{split} round {i + 1}: " + json.dumps({k: round(v, 3) for k, v in log[i].items()}))


if __name__ == "__main__":
    main()
