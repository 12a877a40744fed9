"""Federated transfer learning across feature spaces (atoll.vertical.transfer; docs/transfer.md).

Breast cancer (scikit-learn's bundled table, 569 people, 30 columns): party A holds columns
0-14 and the label of its people, party B columns 15-29 of other people, `--overlap` people are
in both. B's people outside the overlap are the test set. Compared: B alone (logistic regression
on its overlap rows, labelled by A) and FTL (both networks trained on the overlap, A's
non-overlap people entering through Phi^A; B then scores its own people alone).

    PYTHONPATH=src python bench/transfer_ftl.py --overlap 10,20,40,80 --seeds 0,1,2,3,4
"""
import argparse
import statistics

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from torch import nn

from atoll.vertical.split import SplitNN, batches
from atoll.vertical.transfer import SourceParty, TargetParty


def standardise(x):
    return (x - x.mean(0)) / x.std(0)


def run(overlap: int, seed: int, n_a: int, dim: int, epochs: int, gamma: float) -> tuple[float, float]:
    x, y = load_breast_cancer(return_X_y=True)
    x, y = torch.tensor(x), torch.tensor(y, dtype=torch.float64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a_rows, b_rows = perm[:n_a], perm[n_a - overlap:]        # the overlap: perm[n_a - overlap:n_a]
    xa, xb = standardise(x[a_rows, :15]), standardise(x[b_rows, 15:])  # each party its own scaling
    ya, yb = y[a_rows], y[b_rows]
    oa, ob = torch.arange(n_a - overlap, n_a), torch.arange(overlap)
    test = torch.arange(overlap, len(b_rows))
    alone = LogisticRegression(max_iter=1000).fit(xb[ob].numpy(), yb[ob].numpy())
    acc_alone = float((torch.tensor(alone.predict(xb[test].numpy())) == yb[test]).double().mean())
    torch.manual_seed(seed)
    na = nn.Sequential(nn.Linear(15, 16), nn.Tanh(), nn.Linear(16, dim)).double()
    nb = nn.Sequential(nn.Linear(15, 16), nn.Tanh(), nn.Linear(16, dim)).double()

    def adam(ps):
        return torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3)

    a = SourceParty("A", na, xa, ya, oa, "B", dim, adam, gamma=gamma)
    b = TargetParty("B", nb, xb[ob], dim, adam)
    fl = SplitNN([b], a)
    fl.fit(batches(overlap, 16, epochs, seed))
    a.share_phi(fl.channel)
    acc_ftl = float(((b.score(xb[test]) > 0).double() == yb[test]).double().mean())
    return acc_alone, acc_ftl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--overlap", default="10,20,40,80")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--n-a", type=int, default=300)
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--gamma", type=float, default=1.0)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| overlap | B's test people | B alone (LR on the overlap) | FTL | FTL - alone (paired) |")
    print("|---|---|---|---|---|")
    for k in (int(v) for v in args.overlap.split(",")):
        res = [run(k, s, args.n_a, args.dim, args.epochs, args.gamma) for s in seeds]
        alone, ftl = [r[0] for r in res], [r[1] for r in res]
        diff = [f - a for a, f in res]
        sd = statistics.stdev if len(seeds) > 1 else (lambda v: 0.0)
        print(f"| {k} | {569 - args.n_a} | {statistics.mean(alone):.3f} ± {sd(alone):.3f} | "
              f"{statistics.mean(ftl):.3f} ± {sd(ftl):.3f} | {statistics.mean(diff):+.3f} "
              f"(min {min(diff):+.3f}) |")


if __name__ == "__main__":
    main()
