"""Per-class test accuracy of one robustness run (bench/robustness.py's config: digits, 10 + f
clients, the last f attacking), with the secure buckets' draw and weights as knobs. A diagnosis
tool for docs/robustness.md's secure-bucket section (dir0.1, f = 2, seed 5):

    PYTHONPATH=src python bench/secure_bucket_classes.py --rule "secure(s=2) centered_clipping(tau=median)" \
        --split dir0.1 --f 2 --attack sign_flip --seed 5 [--salt K] [--weights one|count|count-claim]

``--salt K`` (K > 0) draws other buckets (the round's bucket key xor a constant times K);
``--weights``: ``one`` (one vote per client, the default with buckets), ``count`` (by record
count, before 2026-12-06), ``count-claim`` (by count, the attackers claiming the largest count
of the split: a record count is the client's own claim). Prints the accuracy, the number of
rounds with every attacker in one bucket, each client's record count per class, and the per-class
accuracy. ``--secure-sum plain`` semantics (``PlainSum``)."""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import robustness as R  # noqa: E402

from atoll import config, rng  # noqa: E402
from atoll.runtime.vmap import VmapRuntime  # noqa: E402
from atoll.simulation import simulate  # noqa: E402


def run(rule, split, f, attack, seed, rounds=40, salt=0, weights="one"):
    text = R.config_text(split, rule, f, attack, rounds, seed)
    cfg = config.load(text=text)
    alg, model, fed, plan = config.build(cfg)
    bad = set(range(R.HONEST, R.HONEST + f)) if attack else set()
    together = [0]
    if alg.secure is not None:
        top = float(max(c.n for c in fed.clients))
        claims = {rng.key(seed, r, c, "secure") for r in range(1, rounds + 1) for c in bad}

        class Probe(R.PlainSum):
            def buckets(self, clients, key):
                g = super().buckets(clients, key ^ (salt * 0x9E3779B97F4A7C15 % (1 << 63)) if salt else key)
                together[0] += bool(bad) and any(set(x) >= bad for x in g)
                return g

            def encode(self, delta, n, key):
                return super().encode(delta, top if weights == "count-claim" and key in claims else n, key)

        mw = 1.0 if weights == "one" else top
        alg = dataclasses.replace(alg, secure=Probe(**{**vars(alg.secure), "max_weight": mw}))
    res = simulate(alg, model, fed, plan, runtime=VmapRuntime(), plots=False)
    pred = torch.func.functional_call(model, res.state.params, (fed.x_test,)).argmax(1)
    k = int(fed.y_test.max()) + 1
    per_class = [round(float((pred[fed.y_test == c] == c).float().mean()), 3) for c in range(k)]
    counts = [[int((c.y == j).sum()) for j in range(k)] for c in fed.clients]
    return {"rule": rule, "split": split, "f": f, "attack": attack, "seed": seed, "salt": salt,
            "weights": weights, "acc": round(float(res.final["test_acc"]), 4),
            "rounds_attackers_together": together[0], "per_class": per_class, "counts": counts}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rule", required=True)
    ap.add_argument("--split", default="dir0.1")
    ap.add_argument("--f", type=int, default=2)
    ap.add_argument("--attack", default="sign_flip", help="an attack, or 'none'")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--salt", type=int, default=0)
    ap.add_argument("--weights", choices=["one", "count", "count-claim"], default="one")
    a = ap.parse_args()
    out = run(a.rule, a.split, a.f, None if a.attack == "none" else a.attack, a.seed, a.rounds,
              a.salt, a.weights)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
