"""Federated transfer learning: a body pretrained on a source task, fine-tuned federatedly on a
target task whose clients hold few examples each (docs/transfer.md).

    PYTHONPATH=src python examples/transfer/transfer.py [--out runs/transfer] [--rounds 20]

Source: a public 40% of scikit-learn's digits (clean), 10 clients, FedAvg, 30 rounds; the run
writes model.pt. Target: the other 60% as another scanner sees them (brightness x 0.7, pixel
noise 0.15) over 50 clients of about 22 examples each (Dirichlet 0.5); three runs of the same
MLP: from scratch, the pretrained body frozen under a new head, and the whole pretrained model
fine-tuned. Prints test accuracy after rounds 1, 5 and the last.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from atoll import config
from atoll.simulation import simulate

logging.getLogger("atoll").setLevel(logging.ERROR)

BASE = """
name = "{name}"
rounds = {rounds}
seed = 0
[data]
name = "{data}"
num_clients = {clients}
partition = "dirichlet"
alpha = 0.5
standardize = false
[model]
name = "mlp"
hidden = [64]
{model}
[client]
lr = 0.1
batch_size = 10
epochs = 1
[eval]
federated = false
every = 1
"""
VARIANTS = {
    "from scratch": "",
    "pretrained body frozen, new head": 'init = "{src}"\ninit_only = ["0."]\nfreeze = ["0."]',
    "pretrained model, fine-tuned": 'init = "{src}"',
}


def split_digits(out: Path) -> tuple[Path, Path]:
    """A public source set (40% of digits, clean) and the clients' target set (the other 60%,
    with pixel noise of std 0.15 and brightness scaled by 0.7: another scanner), as .npz files."""
    d = load_digits()
    g = np.random.default_rng(0)
    x, y = (d.data / 16.0).astype(np.float32), d.target
    order = g.permutation(len(y))
    pub, priv = order[: int(0.4 * len(y))], order[int(0.4 * len(y)):]
    shifted = np.clip(0.7 * x[priv] + g.normal(0, 0.15, x[priv].shape), 0, 1).astype(np.float32)
    src, tgt = out / "source.npz", out / "target.npz"
    np.savez(src, x=x[pub], y=y[pub])
    np.savez(tgt, x=shifted, y=y[priv])
    return src, tgt


def run(text: str, run_dir: Path | None = None):
    res = simulate(*config.build(config.load(text=text)), run_dir=run_dir, plots=False,
                   progress=False, overwrite=True)
    return [m["test_acc"] for m in res.metrics]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/transfer"))
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    src, tgt = split_digits(a.out)
    acc = run(BASE.format(name="source", rounds=30, data=src, clients=10, model=""), a.out / "source")
    print(f"source (public, clean digits, 10 clients, 30 rounds): test accuracy {acc[-1]:.4f}")
    print(f"\n| target (shifted digits, 50 clients) | round 1 | round 5 | round {a.rounds} |\n|---|---|---|---|")
    for name, model in VARIANTS.items():
        acc = run(BASE.format(name="target", rounds=a.rounds, data=tgt, clients=50,
                              model=model.format(src=a.out / "source" / "model.pt")))
        print(f"| {name} | {acc[0]:.4f} | {acc[4]:.4f} | {acc[-1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
