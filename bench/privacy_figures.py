"""Seed 000's claim, measured: test accuracy against epsilon, and uplink bytes, for

  (a) DP intrinsic quantization (US 11,017,322 B1, FIG. 4; ``privacy.mode = "intrinsic"``),
  (b) Gaussian DP with the same per-sample clipping (per coordinate, C) and the same Poisson
      sampling of records, then a separate b-bit stochastic quantizer, at the same epsilon
      (``privacy.mode = "dp_sgd"``, ``norm = "linf"``, one step, noise calibrated to (a)'s
      epsilon, ``quantize_bits = b``); also without the quantizer (float32 uplink),
  (c) no privacy, full precision (float32 uplink), the same one gradient step per round.

    PYTHONPATH=src .venv/bin/python bench/privacy_figures.py [--rounds 20] [--seeds 0 1 2 3 4]

Setup: digits, 10 clients, Dirichlet(0.5) label split, logistic regression (d = 650), every
client every round, records Poisson-sampled at q = 0.2, server step lr = 0.3 (FIG. 4 line 9),
delta = 1e-5, PLD accountant, add/remove one record. All three use the same training loop
(one clipped-gradient mean per client and round, sample-weighted aggregation). Each
configuration runs with every seed (the split, the initial model and the noise change); the
table gives the mean and the range of the final test accuracy. Writes run folders, the
table (``table.md``) and ``tradeoff.png`` (accuracy vs epsilon, accuracy vs uplink bytes)
under ``--out``; ``atoll compare`` on the run folders overlays the curves.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from atoll import config
from atoll.codecs.intrinsic import levels
from atoll.report import compare
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

logging.getLogger("absl").setLevel(logging.ERROR)  # RDP bracketing warnings of the noise calibration

BASE = """
name = "privacy"
rounds = {rounds}
seed = {seed}
[data]
name = "digits"
num_clients = 10
partition = "dirichlet"
alpha = 0.5
[model]
name = "logreg"
[client]
lr = 0.3
steps = 1
batch_size = 29
[sampling]
clients_per_round = 10
[eval]
federated = false
every = 5
[privacy]
delta = 1e-5
clip = 0.5
sample_rate = 0.2
"""
Z = 5
STEPS = (80.0, 40.0, 20.0, 10.0)  # quantization step Delta: larger = more noise = smaller epsilon


def run(out: Path, name: str, rounds: int, seed: int, overrides: list[str]) -> dict:
    text = BASE.format(rounds=rounds, seed=seed)
    if not any(o.startswith("privacy.mode") for o in overrides):  # (c): drop [privacy]
        text = text.split("[privacy]")[0]
    cfg = config.load(text=text, overrides=overrides)
    alg, model, fed, plan = config.build(cfg)
    run_dir = out / f"{name}-s{seed}"
    t0 = time.perf_counter()
    res = simulate(alg, model, fed, plan, run_dir=run_dir, runtime=VmapRuntime(threads=1),
                   config_text=config.dumps(cfg), plots=True, overwrite=True)
    last = res.metrics[-1]
    p = cfg.privacy
    if p.mode == "intrinsic":  # bits per integer of each client: ceil(log2(2K + 1)), K from N_k
        bits = sum(levels(p.step, p.uniforms, p.clip, p.sample_rate * c.n)[1]
                   for c in fed.clients) / len(fed.clients)
    else:
        bits = p.quantize_bits if p.mode != "none" and p.quantize_bits else 32
    return {"name": name, "seed": seed, "acc": res.final["test_acc"],
            "epsilon": last.get("epsilon", math.inf),
            "bytes_up_round": last["bytes_up"], "bits_per_coord": bits,
            "mb_up": last["bytes_up_cum"] / 1e6, "dir": str(run_dir),
            "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/privacy_figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        rows.append(run(out, "nonprivate-f32", args.rounds, seed, []))
        for step in STEPS:
            a = run(out, f"intrinsic-Z{Z}-D{step:g}", args.rounds, seed,
                    ["privacy.mode=intrinsic", f"privacy.uniforms={Z}", f"privacy.step={step}"])
            rows.append(a)
            bits = math.ceil(a["bits_per_coord"])  # b: intrinsic's mean bits per coordinate, rounded up
            gauss = ["privacy.mode=dp_sgd", "privacy.norm=linf", f"privacy.target_epsilon={a['epsilon']}"]
            for b in (bits, bits - 1):
                rows.append(run(out, f"gauss-sq{b}-D{step:g}", args.rounds, seed,
                                gauss + [f"privacy.quantize_bits={b}"]))
            rows.append(run(out, f"gauss-f32-D{step:g}", args.rounds, seed, gauss))
            print(json.dumps(rows[-4:]), flush=True)
    table = summarize(rows) + "\n" + paired(rows)
    (out / "table.md").write_text(table)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    print(table)
    tradeoff_png(rows, out / "tradeoff.png")
    curves = [r for r in rows if r["seed"] == args.seeds[0] and ("D20" in r["name"] or "nonpriv" in r["name"])]
    compare([r["dir"] for r in curves], out / "compare-D20", labels=[r["name"] for r in curves])
    print(f"wrote {out / 'table.md'}, {out / 'tradeoff.png'}, {out / 'compare-D20'}")


def summarize(rows) -> str:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    lines = ["| configuration | epsilon | test acc mean [min, max] | uplink B/round (10 clients) | bits/coord | seeds |",
             "|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        accs = [r["acc"] for r in rs]
        eps = sorted({round(r["epsilon"], 3) for r in rs})
        lines.append(f"| {name} | {', '.join(map(str, eps))} | {sum(accs) / len(accs):.3f} "
                     f"[{min(accs):.3f}, {max(accs):.3f}] | {rs[0]['bytes_up_round']} | "
                     f"{sum(r['bits_per_coord'] for r in rs) / len(rs):.2f} | {len(rs)} |")
    return "\n".join(lines) + "\n"


def paired(rows) -> str:
    """Intrinsic minus each Gaussian variant, seed by seed (same split, model init and epsilon)."""
    acc = {(r["name"], r["seed"]): r["acc"] for r in rows}
    lines = ["| intrinsic minus | test acc difference, mean | intrinsic ahead in | per seed |",
             "|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in rows if r["name"].startswith("gauss")):
        ref = "intrinsic-Z%d-D%s" % (Z, name.rsplit("-D", 1)[1])
        d = [acc[(ref, s)] - acc[(name, s)] for (n, s) in acc if n == name and (ref, s) in acc]
        lines.append(f"| {name} | {sum(d) / len(d):+.3f} | {sum(x > 0 for x in d)}/{len(d)} seeds | "
                     + " ".join(f"{x:+.3f}" for x in d) + " |")
    return "\n".join(lines) + "\n"


def tradeoff_png(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for r in rows:
        family = r["name"].rsplit("-D", 1)[0]
        series.setdefault(family, []).append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for family, rs in sorted(series.items()):
        pts: dict[float, list] = {}
        for r in rs:
            pts.setdefault((round(r["epsilon"], 3), r["mb_up"]), []).append(r["acc"])
        keys = sorted(pts)
        acc = [sum(v) / len(v) for v in (pts[k] for k in keys)]
        if family.startswith("nonprivate"):
            a.axhline(acc[0], linestyle="--", color="gray", label=f"{family} (epsilon = inf)")
        else:
            a.plot([k[0] for k in keys], acc, marker="o", label=family)
        b.plot([k[1] for k in keys], acc, marker="o", linestyle="none", label=family)
    a.set(xlabel="epsilon (delta 1e-5, PLD, add/remove one record)", ylabel="final test accuracy",
          title="accuracy vs privacy")
    b.set(xlabel="total uplink MB", ylabel="final test accuracy", title="accuracy vs uplink bytes",
          xscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
