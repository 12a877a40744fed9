"""Heterogeneous devices (issue 6): accuracy against rounds and simulated time.

    PYTHONPATH=src python bench/hetero_figures.py [--rounds 30] [--target 0.9] [--only normal,extreme]

digits, 100 clients, Dirichlet(0.1), 20 clients per round (async: 20 in flight), MLP(32),
local SGD lr 0.02, batch 10, K_i ~ |N(50, 30^2)| redrawn every round. Two device populations:

* ``normal``: lognormal devices (speed median 20 steps/s, spread 0.5; links 1 MB/s up,
  10 MB/s down, spread 0.5);
* ``extreme``: 99 identical fast devices (20 steps/s) and one 100x slower one.

Synchronous FedAvg, FedProx, FedNova, SCAFFOLD, FedaGrac (seed and published forms) run
``rounds`` rounds; FedBuff (buffer 10) and FedAsync (alpha 0.6) run the same number of client
updates (rounds * 20). Writes runs/hetero/<scenario>-<algo>/ (standard run folders), the plot
docs/img/heterogeneity.png and a Markdown table (also printed): best accuracy, simulated
seconds and rounds (server steps) to the target accuracy.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from atoll import config  # noqa: E402
from atoll.report import reach  # noqa: E402
from atoll.runtime.vmap import VmapRuntime  # noqa: E402
from atoll.simulation import simulate  # noqa: E402

BASE = """
seed = 0
[data]
name = "digits"
num_clients = 100
partition = "dirichlet"
alpha = 0.1
[model]
name = "mlp"
hidden = [32]
[client]
lr = 0.02
batch_size = 10
[sampling]
clients_per_round = 20
[eval]
federated = false
[devices]
steps = "normal"
steps_mean = 50
steps_std = 30
speed = 20
up = 1e6
down = 1e7
"""
SCENARIOS = {
    "normal": ["devices.profile=lognormal", "devices.spread=0.5"],
    "extreme": ["devices.profile=extreme", "devices.slow=1", "devices.slowdown=100"],
}
ALGORITHMS = {
    "FedAvg": [],
    "FedProx": ["algorithm.name=fedprox", "algorithm.mu=0.1"],
    "FedNova": ["algorithm.name=fednova"],
    "SCAFFOLD": ["algorithm.name=scaffold"],
    "FedaGrac (seed)": ["algorithm.name=fedagrac", "algorithm.form=seed"],
    "FedaGrac (published)": ["algorithm.name=fedagrac", "algorithm.form=published"],
    "FedBuff": ["async.mode=fedbuff", "async.concurrency=20", "async.buffer=10"],
    "FedAsync": ["async.mode=fedasync", "async.concurrency=20", "async.alpha=0.6"],
}
OUT = Path("runs/hetero")


def run(scenario: str, algo: str, rounds: int):
    over = SCENARIOS[scenario] + ALGORITHMS[algo]
    steps = rounds
    if algo == "FedBuff":
        steps = rounds * 2      # 20 client updates per round / buffer 10
    elif algo == "FedAsync":
        steps = rounds * 20     # one server step per client update
    over += [f"rounds={steps}", f"eval.every={max(1, steps // rounds)}"]
    cfg = config.load(text=BASE, overrides=over)
    alg, model, data, plan = config.build(cfg)
    name = f"{scenario}-{algo.lower().replace(' ', '-').replace('(', '').replace(')', '')}"
    t0 = time.perf_counter()
    res = simulate(alg, model, data, plan, run_dir=OUT / name, runtime=VmapRuntime(threads=2),
                   config_text=config.dumps(cfg), plots=False, overwrite=True)
    return res.metrics, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--algos", default=",".join(ALGORITHMS))
    ap.add_argument("--plot", default="docs/img/heterogeneity.png")
    args = ap.parse_args()
    scenarios, algos = args.only.split(","), args.algos.split(",")
    results = {}
    for sc in scenarios:
        for algo in algos:
            metrics, sec = run(sc, algo, args.rounds)
            results[sc, algo] = metrics
            last = [m for m in metrics if m.get("test_acc") is not None][-1]
            print(f"{sc:8s} {algo:22s} acc {last['test_acc']:.3f}  sim {last['sim_time']:9.1f} s "
                  f"wall {sec:6.1f} s", flush=True)
    table = ["| devices | algorithm | final acc | best acc | sim. s to "
             f"{args.target:.0%} | server steps to {args.target:.0%} | sim. s total |",
             "|---|---|---|---|---|---|---|"]
    for sc in scenarios:
        for algo in algos:
            m = results[sc, algo]
            accs = [r["test_acc"] for r in m if r.get("test_acc") is not None]
            t = reach(m, args.target, "sim_time")
            rd = reach(m, args.target, "round")
            table.append(f"| {sc} | {algo} | {accs[-1]:.3f} | {max(accs):.3f} | "
                         f"{'—' if t is None else f'{t:.0f}'} | {'—' if rd is None else rd} | "
                         f"{m[-1]['sim_time']:.0f} |")
    print("\n".join(table))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(12, 4.2 * len(scenarios)), squeeze=False)
    for i, sc in enumerate(scenarios):
        for algo in algos:
            m = [r for r in results[sc, algo] if r.get("test_acc") is not None]
            style = "--" if algo in ("FedBuff", "FedAsync") else "-"
            # rounds axis: client updates / 20, so async runs share the synchronous x axis
            per = {"FedBuff": 2, "FedAsync": 20}.get(algo, 1)
            axes[i, 0].plot([r["round"] / per for r in m], [r["test_acc"] for r in m], style, label=algo)
            axes[i, 1].plot([r["sim_time"] for r in m], [r["test_acc"] for r in m], style, label=algo)
        axes[i, 0].set(title=f"{sc} devices", xlabel="round (client updates / 20)", ylabel="test accuracy")
        axes[i, 1].set(title=f"{sc} devices", xlabel="simulated time (s)", ylabel="test accuracy",
                       xscale="log")
        for ax in axes[i]:
            ax.axhline(args.target, color="grey", lw=0.5)
            ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    (OUT / "table.md").write_text("\n".join(table) + "\n")
    (OUT / "results.json").write_text(json.dumps({f"{s}/{a}": m for (s, a), m in results.items()}))
    print(f"wrote {args.plot} and {OUT / 'table.md'}")


if __name__ == "__main__":
    main()
