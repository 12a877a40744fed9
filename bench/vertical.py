"""Vertical training figures: split learning's bytes per step and exactness, hetero logistic
regression's time per epoch and exactness, and the label-leakage table (attack AUC vs noise).

    PYTHONPATH=src .venv/bin/python bench/vertical.py [--part split|hetero|leakage] [--plot PNG]

Times are process CPU time (``time.process_time``, one torch thread): the work done, not the
queue of a shared machine.
"""
import argparse
import copy
import statistics
import time

import torch
from torch import nn

from atoll.vertical import leakage as L
from atoll.vertical.hetero_lr import ActiveParty, HeteroLR
from atoll.vertical.split import BottomParty, JoinedModel, LabelParty, SplitNN, batches


def split_figures(n=4096, batch=256, k=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 24, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 20] > 1).double().unsqueeze(1)
    torch.manual_seed(0)
    mk = lambda d: nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, k)).double()  # noqa: E731
    bottoms, top = [mk(16), mk(8)], nn.Sequential(nn.Linear(2 * k, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    cols = [slice(0, 16), slice(16, 24)]
    central = copy.deepcopy(JoinedModel(bottoms, cols, top))
    opt = lambda ps: torch.optim.Adam(ps, lr=0.01)  # noqa: E731
    parties = [BottomParty(name, b, x[:, c], opt) for name, b, c in zip(("telecom", "bank"), bottoms, cols)]
    bce = nn.functional.binary_cross_entropy_with_logits
    net = SplitNN(parties, LabelParty("bank", top, y, bce, opt, {"telecom": k, "bank": k}))
    plan = batches(n, batch, 1, 0)
    t0 = time.process_time()
    got = net.fit(plan)
    dt = (time.process_time() - t0) / len(plan)
    o, ref = opt(central.parameters()), []
    for rows in plan:
        loss = nn.functional.binary_cross_entropy_with_logits(central(x[rows]), y[rows])
        o.zero_grad(), loss.backward(), o.step()
        ref.append(loss.item())
    per_step = net.channel.total() / len(plan)
    print(f"split: {n} rows, batch {batch}, cut width {k}, float64, 1 epoch = {len(plan)} steps")
    emb = batch * k * 8
    print(f"  bytes per step {per_step:.0f} (= rows {batch * 8} + embedding {emb} + gradient {emb})")
    diff = max(abs(a - b) for a, b in zip(got, ref))
    print(f"  CPU per step {dt * 1e3:.2f} ms; max |loss - centralised| {diff:.1e}")


def hetero_figures(rows=((1024, 1000), (2048, 200)), da=10, db=5, batch=100):
    for bits, n in rows:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, da + db, generator=g, dtype=torch.float64)
        y = (x @ torch.linspace(1, -1, da + db, dtype=torch.float64) > 0).double()
        proto = HeteroLR(ActiveParty(x[:, da:], y, 0.5, d_passive=da, key_bits=bits), x[:, :da])
        plan = batches(n, batch, 1, 0)
        t0 = time.process_time()
        got = proto.fit(plan)
        dt = time.process_time() - t0
        w = torch.zeros(da + db, dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        ref = []
        for r in plan:
            loss = nn.functional.binary_cross_entropy_with_logits(x[r] @ w + b, y[r])
            gw, gb = torch.autograd.grad(loss, [w, b])
            with torch.no_grad():
                w -= 0.5 * gw
                b -= 0.5 * gb
            ref.append(loss.item())
        mb = proto.channel.total() / 2 ** 20
        print(f"hetero LR: Paillier {bits} bits, {n} rows x ({da} passive + {db} active) features, batch {batch}:"
              f" CPU {dt:.2f} s per epoch ({dt / n * 1e3:.1f} ms per row), {mb:.2f} MiB per epoch,"
              f" max |loss - centralised| {max(abs(a - c) for a, c in zip(got, ref)):.1e}")


def leakage_table(noises=(0.0, 0.001, 0.003, 0.01, 0.03, 0.1), seeds=(0, 1, 2), plot=None):
    print("label leakage: imbalanced task (10 % positive), 4000 rows (3200 train), 10 epochs, batch 64;"
          f" mean over seeds {list(seeds)}")
    print("| gradient noise std | norm attack AUC | cosine attack AUC | held-out ROC AUC | train loss |")
    print("|---|---|---|---|---|")
    table = []
    for s in noises:
        rs = [L.experiment(s, seed=seed) for seed in seeds]
        keys = ("norm_auc", "cosine_auc", "test_auc", "train_loss")
        m = {k: statistics.mean(r[k] for r in rs) for k in keys}
        table.append((s, m))
        print(f"| {s:g} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        xs = [max(s, 3e-4) for s, _ in table]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key, name in (("norm_auc", "norm attack AUC"), ("cosine_auc", "cosine attack AUC"),
                          ("test_auc", "model held-out AUC")):
            ax.plot(xs, [m[key] for _, m in table], marker="o", label=name)
        ax.set_xscale("log"), ax.set_xlabel("noise std on cut-layer gradients (0 drawn at 3e-4)")
        ax.axhline(0.5, color="grey", lw=0.5), ax.legend(fontsize=8), fig.tight_layout()
        fig.savefig(plot, dpi=120)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["split", "hetero", "leakage"], action="append")
    ap.add_argument("--plot", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    parts = a.part or ["split", "hetero", "leakage"]
    if "split" in parts:
        split_figures()
    if "hetero" in parts:
        hetero_figures()
    if "leakage" in parts:
        leakage_table(plot=a.plot)
