"""Evaluation of the global model: centralized on a held-out set, federated on each client's
local test split (sample-weighted mean, 10th percentile and minimum across clients)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.func import functional_call

from atoll.tree import Tree


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` (every submodule) in eval mode inside the block, each module's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def per_sample(model: torch.nn.Module, params: Tree, x: torch.Tensor, y: torch.Tensor,
               batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (loss, correct) of the model with ``params`` (and its buffers: BatchNorm's
    running statistics), in eval mode (no dropout), in chunks of ``batch``."""
    losses, correct = [], []
    for i in range(0, x.shape[0], batch):
        with eval_mode(model):
            logits = functional_call(model, params, (x[i:i + batch],))
        losses.append(F.cross_entropy(logits, y[i:i + batch], reduction="none"))
        correct.append((logits.argmax(-1) == y[i:i + batch]).to(logits.dtype))
    if not losses:
        empty = torch.zeros(0)
        return empty, empty
    return torch.cat(losses), torch.cat(correct)


def centralized(model, params, x, y) -> dict[str, float]:
    loss, correct = per_sample(model, params, x, y)
    return {"test_loss": float(loss.mean()), "test_acc": float(correct.mean())}


def global_train_loss(model, params, clients) -> dict[str, float]:
    """Loss and accuracy of the global model on the union of the clients' training data (the
    objective plotted in the FedProx paper's figures)."""
    x = torch.cat([c.x for c in clients])
    y = torch.cat([c.y for c in clients])
    loss, correct = per_sample(model, params, x, y)
    return {"global_train_loss": float(loss.mean()), "global_train_acc": float(correct.mean())}


class FederatedEval:
    """Evaluates on all clients' local test splits with one batched forward pass."""

    def __init__(self, clients):
        sizes = [c.y_test.shape[0] for c in clients]
        self.sizes = torch.tensor(sizes)
        self.owner = torch.repeat_interleave(torch.arange(len(clients)), self.sizes)
        self.x = torch.cat([c.x_test for c in clients])
        self.y = torch.cat([c.y_test for c in clients])

    def __call__(self, model, params) -> tuple[dict[str, float], list[float | None]]:
        if self.y.shape[0] == 0:
            return {}, [None] * len(self.sizes)
        loss, correct = per_sample(model, params, self.x.to(_dtype(params)), self.y)
        n = len(self.sizes)
        acc_sum = torch.zeros(n, dtype=correct.dtype).index_add_(0, self.owner, correct)
        has = self.sizes > 0
        acc = acc_sum[has] / self.sizes[has]
        per_client = [None] * n
        for i, a in zip(torch.nonzero(has).flatten().tolist(), acc.tolist()):
            per_client[i] = a
        summary = {
            "fed_acc_mean": float(correct.mean()),  # sample-weighted over all clients
            "fed_acc_p10": float(torch.quantile(acc.double(), 0.1)),
            "fed_acc_min": float(acc.min()),
            "fed_loss_mean": float(loss.mean()),
        }
        return summary, per_client


def _dtype(params: Tree) -> torch.dtype:
    return next(iter(params.values())).dtype
