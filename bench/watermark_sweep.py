"""Paired clean-accuracy cost of watermark embedding variants (docs/watermark.md, "Figures").

    PYTHONPATH=src python bench/watermark_sweep.py --seeds 0 1 2 --variant "watermark.preserve=1" ...

Each seed trains the quickstart once without the watermark and once per variant (the default
watermark plus that variant's overrides, separated by spaces); it prints, per variant, the cost
in points (mean +- standard error over the seeds, paired; the standard deviation and the
two-sided 95% confidence interval of the mean, Student's t) and how many seeds' models are still
detected at p <= 1e-6 after 10% fine-tuning for 10 epochs and after 50% pruning, and each
variant's paired difference from the first. A variant's token ``skip_last=K`` is not a config
override: the server skips its embedding in the last K rounds (does the cost come from a last
embedding that no client repairs?).
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

from scipy.stats import t as student

from atoll import config
from atoll import watermark as W
from watermark import QUICKSTART, accuracy, prune, steal_finetune, train  # bench/watermark.py

FAST = ["eval.every=30"]  # evaluate the final model only: training is the same
EMBED = W.embed


def train_variant(seed, key_file, variant):
    """``train`` with the watermark and ``variant``'s overrides; its ``skip_last=K`` token makes
    the server skip the embedding in the last K rounds (``watermark_step`` calls ``W.embed``)."""
    tokens = variant.split()
    skip = sum(int(t.split("=")[1]) for t in tokens if t.startswith("skip_last="))
    extra = FAST + [t for t in tokens if not t.startswith("skip_last=")]
    last = config.load(QUICKSTART, extra).rounds - skip  # the last round that embeds

    def embed(model, params, triggers, steps, lr, batch=50, key=b"", round_=0, **options):
        return params if round_ > last else EMBED(model, params, triggers, steps, lr, batch, key, round_, **options)

    W.embed = embed
    try:
        return train(seed, key_file, True, extra)
    finally:
        W.embed = EMBED


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variant", action="append", default=[], help='overrides, e.g. "watermark.preserve=1"')
    ap.add_argument("--no-default", action="store_true", help="run only the --variant settings")
    args = ap.parse_args()
    variants = ([] if args.no_default else [""]) + args.variant
    key_file = f"{tempfile.mkdtemp()}/watermark.key"
    Path(key_file).write_bytes(hashlib.sha256(b"atoll bench watermark").digest())
    key = W.load_key(key_file)
    rows = {v: [] for v in variants}
    for seed in args.seeds:
        cfg, model, fed, base = train(seed, key_file, False, FAST)
        a0 = accuracy(model, base, fed.x_test, fed.y_test)
        for v in variants:
            cfg, model, fed, wm = train_variant(seed, key_file, v)
            w = cfg.watermark
            triggers = W.trigger_set(key, w.trigger_size, (fed.n_features,), fed.n_classes, w.scale)
            cost = 100 * (a0 - accuracy(model, wm, fed.x_test, fed.y_test))
            ft = W.verify(model, steal_finetune(model, wm, fed, seed), triggers)
            pr = W.verify(model, prune(wm), triggers)
            rows[v].append((cost, ft["owned"], pr["owned"], ft["p_value"], pr["p_value"]))
            print(f"seed {seed} [{v or 'default'}]: cost {cost:+.2f} pts; p fine-tuned "
                  f"{ft['p_value']:.1e}, pruned {pr['p_value']:.1e}", flush=True)
    for v, r in rows.items():
        n = len(r)
        mean = sum(c[0] for c in r) / n
        sd = (sum((c[0] - mean) ** 2 for c in r) / max(n - 1, 1)) ** 0.5
        se, half = sd / n ** 0.5, float(student.ppf(0.975, max(n - 1, 1))) * sd / n ** 0.5
        print(f"[{v or 'default'}] cost {mean:+.2f} +- {se:.2f} pts over {n} seeds (std {sd:.2f}, 95% CI "
              f"[{mean - half:+.2f}, {mean + half:+.2f}]); detected after "
              f"fine-tuning {sum(c[1] for c in r)}/{n} (worst p {max(c[3] for c in r):.1e}), "
              f"after pruning {sum(c[2] for c in r)}/{n} (worst p {max(c[4] for c in r):.1e})")
        d = [c[0] - b[0] for c, b in zip(r, rows[variants[0]])]
        if v != variants[0]:
            print(f"[{v or 'default'}] - [{variants[0] or 'default'}]: {sum(d) / n:+.3f} +- "
                  f"{(sum((x - sum(d) / n) ** 2 for x in d) / max(n - 1, 1)) ** 0.5 / n ** 0.5:.3f} pts (paired)")


if __name__ == "__main__":
    main()
