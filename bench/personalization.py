"""Personalized FL (issue 16): each client's own model against FedAvg's global model.

    PYTHONPATH=src python bench/personalization.py [--rounds 100] [--epochs 5] [--algos FedAvg,Ditto] [--set KEY=VALUE]
        [--data digits|mnistlike] [--model mlp|logreg] [--out runs/personal]

digits, 100 clients, ``partition = "shards"`` with 2 shards per client (2 labels for 93 clients,
1 for 7), about 7 training and 7 test samples per client (``client_test_fraction = 0.5``),
MLP(64), 10 clients per round, local SGD lr 0.05, batch 10, ``--epochs`` local epochs; the last
10 clients never train (new clients, fine-tuned for one round of their own update). Every 5
rounds: ``fed_acc_mean`` (the global model on every client's test split, sample-weighted),
``pers_acc_mean`` / ``pers_acc_p10`` (each training client's own model on its own split) and
``new_acc_mean``. Writes runs/personal/<algo>/ (run folders), docs/img/personalization.png and
a Markdown table (printed, and runs/personal/table.md).

``--data mnistlike``: the generated MNIST-shaped task (the built-in data set ``mnistlike``: 12,000
samples of 784 features, 10 classes; 20 % held out as the global test set), same split and protocol (94
clients see 2 labels, 6 see 1; about 48 training and 48 test samples per client). ``--model logreg``: multinomial logistic regression instead of MLP(64) (FedPer, FedRep
and LG-FedAvg need a body and a head, so they are refused with it).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from atoll import config  # noqa: E402
from atoll.runtime.vmap import VmapRuntime  # noqa: E402
from atoll.simulation import simulate  # noqa: E402

BASE = """
seed = 0
[data]
name = "digits"
num_clients = 100
partition = "shards"
shards_per_client = 2
client_test_fraction = 0.5
[client]
lr = 0.05
batch_size = 10
[sampling]
clients_per_round = 10
[eval]
every = 5
personal = true
new_clients = 10
finetune = 1
"""
ALGORITHMS = {
    "FedAvg": ["algorithm.name=fedavg"],
    "Ditto": ["algorithm.name=ditto", "algorithm.lam=0.1"],
    "FedPer": ["algorithm.name=fedper"],
    "FedRep": ["algorithm.name=fedrep", "algorithm.head_epochs=2"],
    "LG-FedAvg": ["algorithm.name=lg_fedavg"],
    "APFL": ["algorithm.name=apfl", "algorithm.alpha=0.25"],
    "pFedMe": ["algorithm.name=pfedme", "algorithm.lam=15", "algorithm.inner_steps=5",
               "algorithm.inner_lr=0.05"],
    "Per-FedAvg-FO": ["algorithm.name=per_fedavg", "algorithm.variant=fo", "algorithm.inner_lr=0.2"],
    "Per-FedAvg-HF": ["algorithm.name=per_fedavg", "algorithm.variant=hf", "algorithm.inner_lr=0.2"],
}
MODELS = {"mlp": '[model]\nname = "mlp"\nhidden = [64]\n', "logreg": '[model]\nname = "logreg"\n'}
OUT = Path("runs/personal")
KEYS = ("fed_acc_mean", "pers_acc_mean", "pers_acc_p10", "new_acc_mean")


def run(algo: str, rounds: int, epochs: int, more=(), data_name="digits", model="mlp", out=OUT):
    cfg = config.load(text=BASE + MODELS[model],
                      overrides=ALGORITHMS[algo] + [f"rounds={rounds}", f"client.epochs={epochs}",
                                                    f"data.name={data_name}", *more])
    alg, model, fed, plan = config.build(cfg)
    t0 = time.perf_counter()
    res = simulate(alg, model, fed, plan, run_dir=out / algo.lower(), runtime=VmapRuntime(threads=2),
                   config_text=config.dumps(cfg), plots=False, overwrite=True)
    return [m for m in res.metrics if m.get("pers_acc_mean") is not None], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--algos", default=",".join(ALGORITHMS))
    ap.add_argument("--plot", default="docs/img/personalization.png")
    ap.add_argument("--data", choices=("digits", "mnistlike"), default="digits")
    ap.add_argument("--model", choices=tuple(MODELS), default="mlp")
    ap.add_argument("--out", type=Path, default=OUT, help="folder of the run folders and table.md")
    ap.add_argument("--set", action="append", default=[], help="a config override, e.g. data.client_test_fraction=0.5")
    args = ap.parse_args()
    results = {}
    table = ["| algorithm | global acc r20 / r50 / last | own-model acc r20 / r50 / last | own-model p10 last | "
             "new-client acc last | wall s |", "|---|---|---|---|---|---|"]
    for algo in args.algos.split(","):
        m, sec = run(algo, args.rounds, args.epochs, args.set, args.data, args.model, args.out)
        results[algo] = m
        at = [next((r for r in m if r["round"] >= k), m[-1]) for k in (20, 50)] + [m[-1]]
        glob, own = (" / ".join(f"{r[k]:.3f}" for r in at) for k in ("fed_acc_mean", "pers_acc_mean"))
        table.append(f"| {algo} | {glob} | {own} | "
                     f"{at[-1]['pers_acc_p10']:.3f} | {at[-1]['new_acc_mean']:.3f} | {sec:.0f} |")
        print(table[-1], flush=True)
    print("\n".join(table))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for algo, m in results.items():
        line = axes[0].plot([r["round"] for r in m], [r["pers_acc_mean"] for r in m], label=f"{algo}")
        axes[0].plot([r["round"] for r in m], [r["fed_acc_mean"] for r in m], "--", color=line[0].get_color(),
                     alpha=0.6)
        axes[1].plot([r["round"] for r in m], [r["pers_acc_p10"] for r in m], label=algo)
    axes[0].set(title="own model (solid) / global model (dashed), mean over clients",
                xlabel="round", ylabel="accuracy on the client's test split")
    axes[1].set(title="own model, 10th percentile over clients", xlabel="round", ylabel="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    print(f"wrote {args.plot} and {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
