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
accuracy. ``--secure-sum plain`` semantics (``PlainSum``). ``--trace`` (``centered_clipping`` rules):
also each client's share of the aggregate's row weight, averaged over the last ten rounds (the
clip scales of the rule's iterations composed; in a bucket each member gets half its row's), and
the radius and row distances from the centre (first iteration) in the last five rounds.
``--shrink K``: the median radius times K instead of the config's 1/sqrt(s) over secure buckets
(``--shrink 1``: the rule before 2026-12-06)."""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import robustness as R  # noqa: E402

import atoll.aggregators as A  # noqa: E402
from atoll import config, rng  # noqa: E402
from atoll.aggregators.robust import coordinate_median, matrix  # noqa: E402
from atoll.runtime.vmap import VmapRuntime  # noqa: E402
from atoll.simulation import simulate  # noqa: E402


def tracing(log, groups):
    """``A.centered_clipping`` with its rule unchanged, appending per round to ``log``: the rows'
    clients (``groups``' last draw over buckets, else the cohort's ids), their composed weights,
    the first iteration's radius and distances."""
    orig = A.centered_clipping

    def cc(tau=10.0, iters=1, shrink=1.0):
        base, ids = orig(tau, iters, shrink), []

        def weigh(client_ids, samples):
            ids[:] = list(client_ids)
            return base.weigh(client_ids, samples)

        def aggregate(decoded, weights, state):
            out, st = base.aggregate(decoded, weights, state)
            rows, _ = matrix(decoded, weights)
            v, n = state["centre"].to(rows.dtype), rows.shape[0]
            w, radius0, dist0 = torch.zeros(n, dtype=rows.dtype), None, None
            for _ in range(iters):  # the rule's iterations again, for the weights
                dist = (rows - v).norm(dim=1)
                radius = (coordinate_median(dist[:, None])[0] * shrink if tau == "median"
                          else torch.tensor(float(tau)))
                scale = (radius / dist.clamp_min(1e-30)).clamp(max=1.0)
                w = w * (1 - scale.sum() / n) + scale / n
                v = v + (scale[:, None] * (rows - v)).mean(dim=0)
                radius0, dist0 = (radius, dist) if radius0 is None else (radius0, dist0)
            assert torch.allclose(v, st["centre"])
            # over buckets the rows are the buckets' means in the draw's order (weights: ones)
            rows_of = groups.pop("last") if "last" in groups else [[c] for c in ids]
            assert len(rows_of) == n
            log.append({"groups": rows_of, "w": w.tolist(), "radius": float(radius0),
                        "dist": dist0.tolist()})
            return out, st

        return dataclasses.replace(base, aggregate=aggregate, weigh=weigh)

    return orig, cc


def trace_summary(log, bad, last=10):
    clients = sorted(c for g in log[-1]["groups"] for c in g)
    share = {c: 0.0 for c in clients}
    for rec in log[-last:]:
        tot = sum(rec["w"])
        for g, w in zip(rec["groups"], rec["w"]):
            for c in g:
                share[c] += w / len(g) / tot / last
    tail = log[-5:]
    rows = [(d, bool(set(g) & bad)) for rec in tail for g, d in zip(rec["groups"], rec["dist"])]
    rng_ = lambda xs: [round(min(xs), 3), round(max(xs), 3)] if xs else None  # noqa: E731
    return {"share_last10": {c: round(v, 3) for c, v in share.items()},
            "radius_last5": rng_([r["radius"] for r in tail]),
            "dist_last5_honest_rows": rng_([d for d, b in rows if not b]),
            "dist_last5_rows_with_an_attacker": rng_([d for d, b in rows if b])}


def run(rule, split, f, attack, seed, rounds=40, salt=0, weights="one", trace=False, shrink=None):
    """``shrink``: centered clipping's median-radius factor instead of the config's (over secure
    buckets of s: 1/sqrt(s) since 2026-12-06; ``shrink = 1`` is the rule before)."""
    log, groups = [], {}
    orig_cc = A.centered_clipping
    if trace:
        A.centered_clipping = tracing(log, groups)[1]
    if shrink is not None:
        made = A.centered_clipping
        A.centered_clipping = lambda tau=10.0, iters=1, shrink_=1.0: made(tau, iters, shrink)
    try:
        return _run(rule, split, f, attack, seed, rounds, salt, weights, log if trace else None, groups)
    finally:
        A.centered_clipping = orig_cc


def _run(rule, split, f, attack, seed, rounds, salt, weights, log, groups):
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
                groups["last"] = g
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
            "rounds_attackers_together": together[0], "per_class": per_class, "counts": counts,
            **({"trace": trace_summary(log, bad)} if log else {})}


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
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--shrink", type=float, default=None,
                    help="centered clipping's median-radius factor (1: the rule before 2026-12-06)")
    a = ap.parse_args()
    out = run(a.rule, a.split, a.f, None if a.attack == "none" else a.attack, a.seed, a.rounds,
              a.salt, a.weights, a.trace, a.shrink)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
