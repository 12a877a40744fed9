"""Which rows ARC clips in the robustness benchmark's runs (docs/robustness.md, "ARC").

    PYTHONPATH=src python bench/arc_clipped.py [--rule 'arc+centered_clipping(tau=0.3)'] [--seed 0]

For the benchmark's digits protocol (bench/robustness.py: 10 honest clients plus f = 2 attackers,
40 rounds) and each attack, one run with a run folder; from its ``anomaly.jsonl`` (each client's
update norm as the aggregator received it, attacks applied) it counts, per round, which of the
k = floor(2 (f/n) (n - f)) largest-norm rows (k = 3 of 12) are the attackers'. The final test
accuracy equals the benchmark's cell for the same (split, rule, attack, seed)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from robustness import HONEST, config_text  # noqa: E402

from atoll import config  # noqa: E402
from atoll.runtime.vmap import VmapRuntime  # noqa: E402
from atoll.simulation import simulate  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="arc+centered_clipping(tau=0.3)")
    ap.add_argument("--split", default="dir0.1,2labels")
    ap.add_argument("--attacks", default="sign_flip,label_flip,ipm,min_max,gaussian,scaled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=40)
    a = ap.parse_args()
    f = 2
    n = HONEST + f
    k = 2 * f * (n - f) // n
    print(f"{a.rule}, f = {f}, n = {n}, k = {k}, seed {a.seed}\n")
    print("| split | attack | rounds with an attacker among the k largest | attacker rows clipped "
          "(of f per round) | honest rows clipped per round | test acc |\n|---|---|---|---|---|---|")
    for split in a.split.split(","):
        for attack in a.attacks.split(","):
            cfg = config.load(text=config_text(split, a.rule, f, attack, a.rounds, a.seed))
            alg, model, fed, plan = config.build(cfg)
            with tempfile.TemporaryDirectory() as d:
                res = simulate(alg, model, fed, plan, runtime=VmapRuntime(), plots=False,
                               run_dir=Path(d) / "r")
                lines = [json.loads(x) for x in (Path(d) / "r" / "anomaly.jsonl").read_text().splitlines()]
            hit = bad = 0
            for ln in lines:
                top = sorted(range(len(ln["norm"])), key=lambda i: -ln["norm"][i])[:k]
                b = sum(ln["clients"][i] >= HONEST for i in top)
                hit, bad = hit + (b > 0), bad + b
            r = len(lines)
            print(f"| {split} | {attack} | {hit} of {r} | {bad / (f * r):.0%} | {(k * r - bad) / r:.2f} of {k} "
                  f"| {res.final['test_acc']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
