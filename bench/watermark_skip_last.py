"""Does the watermark's accuracy cost come from an embedding in the last rounds, which the
clients' training never repairs? (docs/watermark.md, "The cost with confidence".)

    PYTHONPATH=src:bench python bench/watermark_skip_last.py $(seq 300 339)

Per seed: the quickstart without the watermark, then with the default watermark skipping its
embedding in the last K = 0 (the default itself), 1 and 3 rounds. Prints per seed and K the
paired cost in points, the trigger accuracy as released, and the p-values after 10% fine-tuning
and after 50% pruning; then per K the mean +- standard error and the 95% interval, and the
paired difference from K = 0.
"""
from __future__ import annotations

import hashlib
import statistics as st
import sys
import tempfile
from pathlib import Path

from atoll import watermark as W
from watermark import accuracy, prune, steal_finetune, train  # bench/watermark.py

KS, ROUNDS = (0, 1, 3), 30  # the quickstart's rounds
skip, embed = [0], W.embed


def skipping_embed(model, params, triggers, steps, lr, batch=50, key=b"", round_=0, **options):
    if round_ > ROUNDS - skip[0]:  # round_ is the server step, 1..ROUNDS
        return params
    return embed(model, params, triggers, steps, lr, batch, key, round_, **options)


def main(seeds):
    W.embed = skipping_embed  # watermark_step calls the module's embed
    key_file = f"{tempfile.mkdtemp()}/watermark.key"
    Path(key_file).write_bytes(hashlib.sha256(b"atoll bench watermark").digest())
    key, costs = W.load_key(key_file), {k: [] for k in KS}
    for seed in seeds:
        cfg, model, fed, base = train(seed, key_file, False, ["eval.every=30"])
        a0, line = accuracy(model, base, fed.x_test, fed.y_test), []
        for k in KS:
            skip[0] = k
            cfg, model, fed, wm = train(seed, key_file, True, ["eval.every=30"])
            w = cfg.watermark
            trig = W.trigger_set(key, w.trigger_size, (fed.n_features,), fed.n_classes, w.scale)
            costs[k].append(100 * (a0 - accuracy(model, wm, fed.x_test, fed.y_test)))
            ft = W.verify(model, steal_finetune(model, wm, fed, seed), trig)["p_value"]
            pr = W.verify(model, prune(wm), trig)["p_value"]
            line.append(f"K{k} {costs[k][-1]:+.3f} {W.verify(model, wm, trig)['trigger_accuracy']:.2f} "
                        f"{ft:.1e} {pr:.1e}")
        print(seed, " | ".join(line), flush=True)
    for k, c in costs.items():
        m, se = st.mean(c), st.stdev(c) / len(c) ** 0.5
        d = [x - y for x, y in zip(c, costs[0])]
        print(f"K={k}: cost {m:+.3f} +- {se:.3f} over {len(c)} seeds (95% [{m - 1.96 * se:+.3f}, "
              f"{m + 1.96 * se:+.3f}]); paired against K=0 {st.mean(d):+.3f} +- "
              f"{st.stdev(d) / len(d) ** 0.5:.3f}")


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]])
