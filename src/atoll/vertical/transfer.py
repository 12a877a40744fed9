"""Federated transfer learning across feature spaces (Liu, Kang, Xing, Chen, Yang, "A Secure
Federated Transfer Learning Framework", IEEE Intelligent Systems 2020).

Two parties hold *different features* of *mostly different people*: the source party A has its
own columns and a binary label for each of its ``N_A`` people; the target party B has other
columns and no label. A few people are in both tables (the overlap, aligned by PSI,
``atoll.vertical.psi``). Each party maps its columns to a ``d``-dimensional representation with
a network of its own (u^A, u^B); B's people are scored with A's labelled knowledge,

    phi(u^B) = Phi^A . u^B,    Phi^A = (1 / N_A) sum_i y_i u^A_i   (y in {-1, +1}),

and both networks are trained on the overlap to minimise

    L = mean_overlap log(1 + exp(-y phi(u^B)))  +  gamma mean_overlap ||u^A - u^B||^2

(the paper's L1 + gamma L2; weight decay through the optimizers is its regulariser). After
training A sends B the vector Phi^A (``phi``, d numbers) and B scores any of its people alone,
those outside the overlap included (``TargetParty.score``).

This is split learning's shape (``atoll.vertical.split``) with A as the label party: B is a
bottom party over its overlap rows (``rows`` -> ``embedding``, ``gradient`` -> its step); A's
"top model" is the loss above, whose forward pass also runs A's own network over its whole
table. So ``SplitNN`` drives it unchanged, in one process or over gRPC.

What each party learns (the paper's secure variant hides these with additive homomorphic
encryption; this plaintext variant does not): A sees B's representations of the overlap rows
(as split learning's label party sees embeddings); B sees the loss gradient at those
representations (which leaks the overlap labels as in split learning; the same Gaussian noise
defence applies, ``noise_std``) and, at the end, Phi^A (a class-weighted mean of A's
representations). Neither sees the other's columns, network, or the people outside the overlap:
B's training rows are its overlap rows only, so A cannot ask for a representation of anyone else.
"""
from __future__ import annotations

import math
import secrets

import torch
from torch import nn

from atoll.vertical.channel import Channel, PartyError, check_tensor
from atoll.vertical.split import BottomParty


def ftl_loss(u_a: torch.Tensor, u_b: torch.Tensor, phi: torch.Tensor, y_pm: torch.Tensor,
             gamma: float) -> torch.Tensor:
    """The objective on a batch of overlap rows: logistic loss of ``u_b . phi`` against the
    labels ``y_pm`` (in {-1, +1}) plus ``gamma`` times the mean squared representation gap."""
    fit = nn.functional.softplus(-y_pm * (u_b @ phi)).mean()
    return fit + gamma * (u_a - u_b).pow(2).sum(1).mean()


def class_vector(u: torch.Tensor, y_pm: torch.Tensor) -> torch.Tensor:
    """Phi^A = mean_i y_i u_i over A's labelled people."""
    return (y_pm.unsqueeze(1) * u).mean(0)


class TargetParty(BottomParty):
    """B: ``model`` maps its columns to ``dim`` numbers; ``overlap`` holds its overlap rows in
    the order A aligned them (the only rows A may ask about). Accepts ``phi`` once trained."""

    def __init__(self, name: str, model: nn.Module, overlap: torch.Tensor, dim: int, make_optimizer,
                 max_batch: int = 65536):
        super().__init__(name, model, overlap, make_optimizer, max_batch)
        self.dim, self.phi = dim, None

    def on(self, name: str, msg, sender: str):
        if name == "phi":
            self.phi = check_tensor(msg, sender, "phi", (self.dim,), self.x.dtype).clone()
            return None
        return super().on(name, msg, sender)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """phi(u^B) for any of B's rows (> 0: the positive class), with no message."""
        if self.phi is None:
            raise RuntimeError(f"party {self.name!r}: no 'phi' received yet (train first)")
        with torch.no_grad():
            return self.model(features) @ self.phi


class SourceParty:
    """A: ``model`` over its ``features`` (all ``N_A`` people) with ``labels`` (0/1);
    ``overlap[j]`` is A's row of the j-th overlap person (B's overlap row j). Plays the label
    party of ``SplitNN`` for the target party ``target`` (embedding width ``dim``)."""

    def __init__(self, name: str, model: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                 overlap: torch.Tensor, target: str, dim: int, make_optimizer, gamma: float = 1.0,
                 noise_std: float = 0.0, noise_seed: int | None = None):
        if not (0 <= gamma < math.inf and 0 <= noise_std < math.inf):  # NaN fails both
            raise ValueError(f"transfer: gamma and noise_std must be finite and >= 0, got {gamma}, {noise_std}")
        labels = labels.reshape(-1)
        if labels.numel() != len(features) or not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError(f"transfer: labels must be one 0/1 value per row of the {len(features)} rows")
        if overlap.dtype != torch.int64 or overlap.dim() != 1 or overlap.numel() == 0 \
                or int(overlap.min()) < 0 or int(overlap.max()) >= len(features) \
                or overlap.unique().numel() != overlap.numel():
            raise ValueError("transfer: overlap must be distinct int64 row positions of A's table")
        self.name, self.model, self.x, self.overlap, self.target = name, model, features, overlap, target
        self.y_pm = 2 * labels.to(features.dtype) - 1
        self.dims, self.gamma, self.noise_std = {target: dim}, gamma, noise_std
        self.opt = make_optimizer(model.parameters())
        self.gen = torch.Generator().manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)

    def phi(self) -> torch.Tensor:
        with torch.no_grad():
            return class_vector(self.model(self.x), self.y_pm)

    def _u_b(self, embeddings: dict, batch: int) -> torch.Tensor:
        if set(embeddings) != {self.target}:
            raise PartyError(f"party {self.target!r}: field 'embedding' expected from it alone, got "
                             f"{sorted(embeddings)}")
        return check_tensor(embeddings[self.target], self.target, "embedding",
                            (batch, self.dims[self.target]), self.x.dtype)

    def train_step(self, rows: torch.Tensor, embeddings: dict) -> tuple[float, dict]:
        """The loss on overlap ``rows`` and the gradient at B's representations; A's network
        steps at ``commit()``."""
        u_b = self._u_b(embeddings, len(rows)).clone().requires_grad_(True)
        phi = class_vector(self.model(self.x), self.y_pm)
        loss = ftl_loss(self.model(self.x[self.overlap[rows]]), u_b, phi,
                        self.y_pm[self.overlap[rows]], self.gamma)
        self.opt.zero_grad()
        loss.backward()
        g = u_b.grad
        if self.noise_std > 0:
            g = g + self.noise_std * torch.randn(g.shape, generator=self.gen, dtype=g.dtype)
        return loss.item(), {self.target: g}

    def commit(self) -> None:
        self.opt.step()

    def top_output(self, embeddings: dict, batch: int) -> torch.Tensor:
        """phi(u^B) for overlap rows whose representations B sent."""
        return self._u_b(embeddings, batch) @ self.phi()

    def share_phi(self, channel: Channel) -> None:
        """Send Phi^A to B, which then scores its own people alone."""
        channel.ask(self.name, self.target, "phi", self.phi())
