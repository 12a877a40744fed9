"""Watermark and fingerprint figures for docs/watermark.md (digits, MLP [64], the quickstart).

    PYTHONPATH=src python bench/watermark.py [--seeds 0 1 2] [--set watermark.steps=20 ...]

For each seed: the quickstart with and without ``[watermark]``; the clean-accuracy cost; the
watermark's p-value on the stolen model as it is, after fine-tuning on 10% of the training data
for 10 epochs (the clients' SGD, lr 0.1, batch 10), after 50% magnitude pruning of every weight
matrix, and after both; the p-value of the run trained without the watermark (false positives).
The cost in brackets: one embedding step applied to the run trained without the watermark.
Then per-client fingerprints embedded into the watermarked model: accuracy cost and tracing.
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch

from atoll import config
from atoll import tree as T
from atoll import watermark as W
from atoll.simulation import simulate

QUICKSTART = Path(__file__).resolve().parents[1] / "examples/quickstart/digits.toml"


def train(seed: int, key_file: str, watermark: bool, extra: list[str]):
    cfg = config.load(QUICKSTART, [f"seed={seed}", f"watermark.enabled={str(watermark).lower()}",
                                   f'watermark.key_file="{key_file}"', *extra])
    algorithm, model, fed, plan = config.build(cfg)
    params = simulate(algorithm, model, fed, plan).state.params
    return cfg, model, fed, params


def accuracy(model, params, x, y) -> float:
    return float((W.predict(model, params, x) == y).float().mean())


def steal_finetune(model, params, fed, seed: int, fraction=0.1, epochs=10, lr=0.1, batch=10):
    """The thief's fine-tuning: ``epochs`` of SGD on a random ``fraction`` of the training data."""
    x = torch.cat([c.x for c in fed.clients])
    y = torch.cat([c.y for c in fed.clients])
    g = torch.Generator().manual_seed(1000 + seed)
    keep = torch.randperm(len(y), generator=g)[:round(fraction * len(y))]
    x, y = x[keep], y[keep]
    return W.finetune(model, params, x, y, steps=epochs * -(-len(y) // batch), lr=lr, batch=batch,
                      key=b"thief%d" % seed)


def prune(params, fraction=0.5):
    """Zero the ``fraction`` smallest-magnitude entries of every weight matrix."""
    out = dict(params)
    for k, v in params.items():
        if v.dim() >= 2:
            cut = v.abs().flatten().kthvalue(max(1, int(fraction * v.numel()))).values
            out[k] = torch.where(v.abs() <= cut, torch.zeros_like(v), v)
    return out


def attacks(model, params, fed, seed, stress=False):
    ft = steal_finetune(model, params, fed, seed)
    out = {"as is": params, "fine-tuned": ft, "pruned 50%": prune(params), "both": prune(ft)}
    if stress:  # beyond the targets: all the training data; 80% pruning
        out.update({"fine-tuned on 100%": steal_finetune(model, params, fed, seed, fraction=1.0),
                    "pruned 80%": prune(params, 0.8)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. watermark.steps=10")
    ap.add_argument("--stress", action="store_true", help="also fine-tune on all data, prune 80%%")
    ap.add_argument("--margin", type=float, default=0.5, help="fingerprint margin (0: no fingerprints)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    key_file = f"{tmp}/watermark.key"
    Path(key_file).write_bytes(hashlib.sha256(b"atoll bench watermark").digest())
    key = W.load_key(key_file)
    print("seed | clean acc (no wm / wm) | cost (pts; of one embedding step) | p as is | fine-tuned | pruned 50% | both "
          "| acc after ft / prune | p of model without wm")
    costs, detected, null_p = [], {}, []
    for seed in args.seeds:
        cost, ps, p0 = seed_row(seed, key_file, key, args)
        costs.append(cost)
        null_p.append(p0)
        for k, v in ps.items():
            detected[k] = detected.get(k, 0) + v["owned"]
    n = len(costs)
    mean = sum(costs) / n
    se = (sum((c - mean) ** 2 for c in costs) / max(n - 1, 1) / n) ** 0.5
    fp = "none claimed" if all(p > W.ALPHA for p in null_p) else "FALSE POSITIVE"
    print(f"\nover {n} seeds: clean accuracy cost {mean:+.2f} +- {se:.2f} pts (mean +- standard error); "
          "detected at p <= 1e-6: " + ", ".join(f"{k} {v}/{n}" for k, v in detected.items())
          + f"; models without the watermark: smallest p {min(null_p):.2f} ({fp})")


def seed_row(seed, key_file, key, args):
    """One seed's row: (accuracy cost in points, verifications of the stolen model, p of the
    model trained without the watermark)."""
    cfg, model, fed, base = train(seed, key_file, False, args.set)
    _, _, _, wm = train(seed, key_file, True, args.set)
    w = cfg.watermark
    triggers = W.trigger_set(key, w.trigger_size, (fed.n_features,), fed.n_classes, w.scale)
    a0, a1 = accuracy(model, base, fed.x_test, fed.y_test), accuracy(model, wm, fed.x_test, fed.y_test)
    stolen = attacks(model, wm, fed, seed, args.stress)
    ps = {k: W.verify(model, v, triggers) for k, v in stolen.items()}
    accs = [accuracy(model, stolen[k], fed.x_test, fed.y_test) for k in ("fine-tuned", "pruned 50%")]
    step = W.watermark_step(model, triggers, key, w.steps, w.lr, batch=w.batch)
    once = T.add(base, step.update(T.zeros_like(base), step.init(base), base, {})[0])
    direct = a0 - accuracy(model, once, fed.x_test, fed.y_test)
    p0 = W.verify(model, base, triggers)["p_value"]
    print(f"{seed} | {a0:.4f} / {a1:.4f} | {100 * (a0 - a1):+.2f} ({100 * direct:+.2f}) | "
          + " | ".join(f"{ps[k]['p_value']:.1e} ({ps[k]['trigger_accuracy']:.2f})" for k in ps)
          + f" | {accs[0]:.4f} / {accs[1]:.4f} | {p0:.2f}")
    if args.margin:
        fingerprint_rows(model, wm, base, fed, key, seed, args.margin)
    return 100 * (a0 - a1), ps, p0


def fingerprint_rows(model, wm, base, fed, key, seed, margin, clients=10):
    fp = W.fingerprints(key, wm, clients)
    a = accuracy(model, wm, fed.x_test, fed.y_test)
    costs, worst, right = [], {}, {}
    for c in range(clients):
        mine = W.embed_fingerprint(wm, fp, c, margin)
        costs.append(a - accuracy(model, mine, fed.x_test, fed.y_test))
        for name, leaked in attacks(model, mine, fed, seed + 100 * c).items():
            t = W.trace(leaked, fp)
            right[name] = right.get(name, 0) + (t["client"] == c and t["traced"])
            worst[name] = max(worst.get(name, 0.0), t["p_value"])
    print(f"  fingerprints ({clients} clients, {fp.matrix.shape[0]} bits): accuracy cost mean "
          f"{100 * sum(costs) / clients:+.2f} pts, max {100 * max(costs):+.2f}; traced right "
          + ", ".join(f"{k} {right[k]}/{clients} (worst p {worst[k]:.1e})" for k in right)
          + f"; model without wm: p {W.trace(base, fp)['p_value']:.2f}")


if __name__ == "__main__":
    main()
