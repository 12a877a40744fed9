"""Label leakage in two-party split learning, and a defence (Li et al. 2022, "Label Leakage and
Protection in Two-party Split Learning", ICLR).

The non-label party receives, for every example of a batch, the loss gradient at its embedding.
For a binary cross-entropy head, ``g_i = (p_i - y_i) * d logit / d e_i``: positives and negatives
point in opposite directions, and on an imbalanced task the rare class has the larger
``|p_i - y_i|``. Two attacks use only those received gradients (``BottomParty.received``):

- ``norm_scores``: score ``||g_i||`` (large norm -> the rare, positive class);
- ``cosine_scores``: score ``cos(g_i, g_ref)`` with the gradient of an example whose label the
  attacker knows, taken from the same batch (else the latest one seen), signed by that label.

The attack AUC is the ROC AUC of those scores against the true labels (0.5: no leakage). The
defence is Gaussian noise on the gradients the label party sends (``LabelParty(noise_std=...)``);
``experiment`` measures both AUCs and the accuracy cost on a held-out set.
"""
from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from atoll.vertical.split import BottomParty, LabelParty, SplitNN, batches


def _flat(received) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.cat([r for r, _ in received])
    return rows, torch.cat([g.reshape(len(r), -1) for r, g in received])


def norm_scores(received) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, ||g_i||)`` over every received gradient."""
    rows, g = _flat(received)
    return rows, g.norm(dim=1)


def cosine_scores(received, known: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, score)``: cosine with a known-label example's gradient, signed so that a high
    score means label 1. ``known``: {row: label} the attacker knows (one example is enough)."""
    out_rows, out, ref = [], [], None
    for rows, g in received:
        g = g.reshape(len(rows), -1)
        hits = [i for i, r in enumerate(rows.tolist()) if r in known]
        if hits:
            i = hits[0]
            ref = g[i] * (1.0 if known[int(rows[i])] == 1 else -1.0)
        if ref is None:
            continue
        out_rows.append(rows)
        out.append(nn.functional.cosine_similarity(g, ref.unsqueeze(0), dim=1, eps=1e-30))
    if not out:
        raise ValueError("leakage: no received batch holds an example of known label")
    return torch.cat(out_rows), torch.cat(out)


def attack_auc(rows: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of ``scores`` for the true labels of ``rows``."""
    return float(roc_auc_score(labels[rows].reshape(-1).numpy(), scores.numpy()))


def imbalanced_task(n: int, seed: int, positive_rate: float = 0.1, d_passive: int = 8, d_label: int = 4):
    """Seeded binary task, labels from a logistic model of both parties' features, with the
    intercept set so that about ``positive_rate`` of the rows are positive."""
    g = torch.Generator().manual_seed(seed)
    xp = torch.randn(n, d_passive, generator=g, dtype=torch.float64)
    xl = torch.randn(n, d_label, generator=g, dtype=torch.float64)
    score = xp @ torch.linspace(1.0, -0.5, d_passive, dtype=torch.float64) + 0.8 * xl[:, 0]
    score = score + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    y = (score > torch.quantile(score, 1 - positive_rate)).to(torch.float64)
    return xp, xl, y.unsqueeze(1)


def _build(xp, xl, y, noise_std, seed, lr, linear_top=False):
    torch.manual_seed(seed)
    bp = nn.Sequential(nn.Linear(xp.shape[1], 4), nn.ReLU()).double()
    bl = nn.Sequential(nn.Linear(xl.shape[1], 4), nn.ReLU()).double()
    top = (nn.Linear(8, 1) if linear_top else nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))).double()
    make = lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9)  # noqa: E731
    parties = [BottomParty("passive", bp, xp, make, record=True), BottomParty("label", bl, xl, make)]
    label = LabelParty("label", top, y, nn.functional.binary_cross_entropy_with_logits, make,
                       {"passive": 4, "label": 4}, noise_std=noise_std, noise_seed=seed + 1)
    return SplitNN(parties, label)


def experiment(noise_std: float, seed: int = 0, n: int = 4000, epochs: int = 10, batch: int = 64,
               lr: float = 0.1, linear_top: bool = False) -> dict:
    """Train split learning on ``imbalanced_task`` (80 % train / 20 % held out) with gradient
    noise ``noise_std``; the passive party attacks the gradients it received during training.
    Returns the attack AUCs, the held-out ROC AUC and accuracy, and the final train loss."""
    xp, xl, y = imbalanced_task(n, seed)
    cut = int(0.8 * n)
    net = _build(xp[:cut], xl[:cut], y[:cut], noise_std, seed, lr, linear_top)
    losses = net.fit(batches(cut, batch, epochs, seed))
    received = net.parties[0].received
    known = {int(torch.nonzero(y[:cut, 0])[0]): 1}
    rows, s = norm_scores(received)
    crow, cs = cosine_scores(received, known)
    net.parties[0].x, net.parties[1].x = xp[cut:], xl[cut:]
    logits = net.predict(torch.arange(n - cut)).reshape(-1)
    yt = y[cut:, 0]
    return {"noise_std": noise_std, "norm_auc": attack_auc(rows, s, y), "cosine_auc": attack_auc(crow, cs, y),
            "test_auc": float(roc_auc_score(yt.numpy(), logits.numpy())),
            "test_acc": float(((logits > 0).double() == yt).double().mean()),
            "train_loss": sum(losses[-20:]) / len(losses[-20:])}
