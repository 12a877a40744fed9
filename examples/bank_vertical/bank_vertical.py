"""A bank and a telecom jointly score credit risk (vertical FL, seed 002's bank use case).

The bank holds the label (default within a year: yes/no) and financial features; the telecom holds
usage features of partly the same people. Neither shares raw data: the ids are aligned first,
then a split neural network is trained (bottom model per party, top model at the bank), and
hetero logistic regression under Paillier on the same rows. We compare with the bank alone and
let the telecom attack the gradients it received (label leakage), with and without noise.

    PYTHONPATH=src python examples/bank_vertical/bank_vertical.py [--people 8000] [--noise 0.01]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from atoll.vertical import leakage, psi
from atoll.vertical.bank import generate  # the example's data (atoll run: dataset = "bank")
from atoll.vertical.hetero_lr import ActiveParty, HeteroLR
from atoll.vertical.split import BottomParty, LabelParty, SplitNN, batches

def align(bank_ids, telecom_ids):
    """Private set intersection (``atoll.vertical.psi``: ECDH over X25519, fresh secret scalars):
    each party learns which of its own ids the other also holds, and nothing about the others.
    Both sort the common ids, so row i is the same person on both sides. Here both parties run
    in this process; between machines, ``atoll psi serve`` / ``atoll psi connect``
    (docs/vertical.md). Returns the row positions of the common people in each party."""
    t0 = time.perf_counter()
    bank, telecom = psi.intersect(list(bank_ids), list(telecom_ids))

    def rows(ids, common):
        where = {v: i for i, v in enumerate(ids)}
        return np.array([where[c] for c in sorted(common)])

    print(f"PSI: {bank.size} people in common, {bank.bytes_sent + telecom.bytes_sent} bytes "
          f"exchanged, {time.perf_counter() - t0:.1f} s")
    return rows(list(bank_ids), bank.intersection), rows(list(telecom_ids), telecom.intersection)


def standardise(x: np.ndarray, train: np.ndarray) -> torch.Tensor:
    """Each party scales its own columns with its own training rows' statistics."""
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-12
    return torch.from_numpy((x - mu) / sd)


def split_nn(xs: dict, y, train, test, noise: float, seed: int, epochs: int = 15):
    """Train the split network on ``train``; (held-out AUC, bytes per step, the telecom's
    received gradients)."""
    torch.manual_seed(seed)
    make = lambda ps: torch.optim.Adam(ps, lr=0.01)  # noqa: E731
    parties = [BottomParty(name, nn.Sequential(nn.Linear(x.shape[1], 8), nn.ReLU()).double(), x, make,
                           record=name == "telecom") for name, x in xs.items()]
    top = nn.Sequential(nn.Linear(8 * len(xs), 16), nn.ReLU(), nn.Linear(16, 1)).double()
    label = LabelParty("bank", top, y, nn.functional.binary_cross_entropy_with_logits, make,
                       {name: 8 for name in xs}, noise_std=noise, noise_seed=seed)
    net = SplitNN(parties, label)
    plan = [train[r] for r in batches(len(train), 128, epochs, seed)]
    net.fit(plan)
    per_step = net.channel.total() / len(plan)  # training traffic only (prediction crosses too)
    auc = roc_auc_score(y[test, 0].numpy(), net.predict(test).reshape(-1).numpy())
    return auc, per_step, parties[-1].received if "telecom" in xs else []


def main(people=8000, seed=2, noise=0.01, lr_epochs=2, key_bits=1024):
    bank, telecom = generate(people, seed)
    bank_rows, telecom_rows = align(bank["ids"], telecom["ids"])
    n = len(bank_rows)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    train, test = perm[: int(0.7 * n)], perm[int(0.7 * n):]
    xb = standardise(bank["x"][bank_rows], train.numpy())
    xt = standardise(telecom["x"][telecom_rows], train.numpy())
    y = torch.from_numpy(bank["default"][bank_rows]).unsqueeze(1)
    print(f"bank {len(bank['ids'])} customers, telecom {len(telecom['ids'])} subscribers, "
          f"{n} in common; default rate {y.mean():.3f}; train {len(train)}, held out {len(test)}")
    alone, _, _ = split_nn({"bank": xb}, y, train, test, 0.0, seed)
    joint, per_step, received = split_nn({"bank": xb, "telecom": xt}, y, train, test, 0.0, seed)
    noisy, _, received_noisy = split_nn({"bank": xb, "telecom": xt}, y, train, test, noise, seed)
    known = {int(train[torch.nonzero(y[train, 0])[0, 0]]): 1}
    for name, auc, rec in (("no noise", joint, received), (f"noise {noise:g}", noisy, received_noisy)):
        ln = leakage.attack_auc(*leakage.norm_scores(rec), y)
        lc = leakage.attack_auc(*leakage.cosine_scores(rec, known), y)
        print(f"split NN, bank + telecom, {name}: held-out AUC {auc:.3f}; "
              f"telecom's label attacks: norm AUC {ln:.3f}, cosine AUC {lc:.3f}")
    print(f"split NN, bank alone: held-out AUC {alone:.3f}; bytes per step (bank + telecom) {per_step:.0f}")
    t0 = time.process_time()
    proto = HeteroLR(ActiveParty(xb[train], y[train, 0], 0.5, d_passive=xt.shape[1], key_bits=key_bits), xt[train])
    losses = proto.fit(batches(len(train), 256, lr_epochs, seed))
    dt = (time.process_time() - t0) / lr_epochs
    score = xt[test] @ proto.passive.w + xb[test] @ proto.active.w + proto.active.b
    print(f"hetero LR (Paillier {key_bits} bits), {lr_epochs} epochs: held-out AUC "
          f"{roc_auc_score(y[test, 0].numpy(), score.numpy()):.3f}, train loss {losses[-1]:.3f}, "
          f"CPU {dt:.1f} s per epoch, {proto.channel.total() / lr_epochs / 2**20:.2f} MiB per epoch")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--lr-epochs", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    main(a.people, a.seed, a.noise, a.lr_epochs)
