"""Paired clean-accuracy cost of watermark embedding variants (docs/watermark.md, "Figures").

    PYTHONPATH=src python bench/watermark_sweep.py --seeds 0 1 2 --variant "watermark.preserve=1" ...

Each seed trains the quickstart once without the watermark and once per variant (the default
watermark plus that variant's overrides, separated by spaces); it prints, per variant, the cost
in points (mean +- standard error over the seeds, paired; the standard deviation and the
two-sided 95% confidence interval of the mean, Student's t) and how many seeds' models are still
detected at p <= 1e-6 after 10% fine-tuning for 10 epochs and after 50% pruning.
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

from scipy.stats import t as student

from atoll import watermark as W
from watermark import accuracy, prune, steal_finetune, train  # bench/watermark.py

FAST = ["eval.every=30"]  # evaluate the final model only: training is the same


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
            cfg, model, fed, wm = train(seed, key_file, True, FAST + v.split())
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


if __name__ == "__main__":
    main()
