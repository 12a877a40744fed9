"""Split neural network (Vepakomma et al. 2018, "Split learning for health"): each party runs a
bottom model on its own columns up to the cut layer; the label party runs the top model.

One training step on a batch of aligned rows (``SplitNN.step``):

1. the label party sends the batch's row positions to every other party (``rows``);
2. each party runs its bottom model and sends the cut-layer output (``embedding``, ``B x k``);
3. the label party concatenates the embeddings in party order, runs the top model and the loss,
   back-propagates to the embeddings and steps the top model;
4. it sends each party the loss gradient at that party's embedding (``gradient``, ``B x k``),
   optionally with Gaussian noise (the leakage defence, ``atoll.vertical.leakage``);
5. each party back-propagates that gradient through its bottom model and steps it.

Invariant: with per-parameter optimizers (SGD, momentum, Adam) the losses equal those of
``JoinedModel`` (the bottom models side by side + the top) trained centrally on the joined table
with the same batches, up to float rounding. What crosses is counted by the ``Channel``.

What each party learns: a non-label party sees the row positions of each batch and the gradient
at its own embedding (which leaks labels: ``atoll.vertical.leakage``); the label party sees every
party's embeddings (a learned function of that party's features; inverting it is the model-
inversion risk split learning keeps) but no raw feature and no bottom-model parameter.
"""
from __future__ import annotations

import secrets

import torch
from torch import nn

from atoll.vertical.channel import Channel, PartyError, check_rows, check_tensor


class BottomParty:
    """A party's bottom model on its own feature table ``features`` (rows aligned)."""

    def __init__(self, name: str, model: nn.Module, features: torch.Tensor, make_optimizer,
                 max_batch: int = 65536, record: bool = False):
        self.name, self.model, self.x, self.max_batch = name, model, features, max_batch
        self.opt = make_optimizer(model.parameters())
        self.received: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, gradient) if record
        self.record, self._out, self._rows = record, None, None

    def embed(self, rows, sender: str, train: bool = True) -> torch.Tensor:
        """The cut-layer output for ``rows`` (checked: they come from ``sender``)."""
        rows = check_rows(rows, sender, len(self.x), self.max_batch)
        if not train:
            with torch.no_grad():
                return self.model(self.x[rows])
        self._out, self._rows = self.model(self.x[rows]), rows
        return self._out.detach()

    def apply_gradient(self, grad, sender: str) -> None:
        """Back-propagate ``sender``'s gradient at the embedding and step the bottom model."""
        if self._out is None:
            raise PartyError(f"party {sender!r}: field 'gradient' arrived with no embedding outstanding")
        check_tensor(grad, sender, "gradient", self._out.shape, self._out.dtype)
        if self.record:
            self.received.append((self._rows, grad.clone()))
        self.opt.zero_grad()
        self._out.backward(grad)
        self.opt.step()
        self._out = None

    def on(self, name: str, msg, sender: str):
        """The endpoint of ``Channel.ask``: ``rows`` (train) or ``eval_rows`` -> the embedding;
        ``gradient`` -> backward and step."""
        if name in ("rows", "eval_rows"):
            return self.embed(msg, sender, train=name == "rows")
        if name == "gradient":
            return self.apply_gradient(msg, sender)
        raise PartyError(f"party {sender!r}: field {name!r} is not a message of split learning")


class LabelParty:
    """The top model and the labels. ``dims``: each party's embedding width, in concatenation
    order (the label party's own bottom model, if any, is one of them). ``noise_std``: Gaussian
    noise added to the gradients sent to the other parties, drawn from a generator only the label
    party holds (``noise_seed`` for a reproducible experiment; None: a secret seed)."""

    def __init__(self, name: str, top: nn.Module, labels: torch.Tensor, loss_fn, make_optimizer,
                 dims: dict[str, int], noise_std: float = 0.0, noise_seed: int | None = None):
        if noise_std < 0:
            raise ValueError(f"split: noise_std must be >= 0, got {noise_std}")
        self.name, self.top, self.y, self.loss_fn, self.dims = name, top, labels, loss_fn, dict(dims)
        self.opt = make_optimizer(top.parameters())
        self.dtype = next(top.parameters()).dtype
        self.noise_std = noise_std
        self.gen = torch.Generator().manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)

    def _check(self, embeddings: dict, batch: int) -> list[torch.Tensor]:
        extra = set(embeddings) - set(self.dims)
        if extra:
            raise PartyError(f"party {sorted(extra)[0]!r}: field 'embedding' from a party not in the model")
        out = []
        for p, k in self.dims.items():
            if p not in embeddings:
                raise PartyError(f"party {p!r}: field 'embedding' is missing")
            out.append(check_tensor(embeddings[p], p, "embedding", (batch, k), self.dtype))
        return out

    def top_output(self, embeddings: dict, batch: int) -> torch.Tensor:
        with torch.no_grad():
            return self.top(torch.cat(self._check(embeddings, batch), 1))

    def train_step(self, rows: torch.Tensor, embeddings: dict) -> tuple[float, dict]:
        """Top forward/backward on checked embeddings: ``(loss, {party: gradient})``. The top
        model steps at ``commit()``, once every party took its gradient: a step that fails
        half-way leaves it as of the last complete step."""
        leaves = [e.clone().requires_grad_(True) for e in self._check(embeddings, len(rows))]
        loss = self.loss_fn(self.top(torch.cat(leaves, 1)), self.y[rows])
        self.opt.zero_grad()
        loss.backward()
        grads = {}
        for p, leaf in zip(self.dims, leaves):
            g = leaf.grad
            if p != self.name and self.noise_std > 0:
                g = g + self.noise_std * torch.randn(g.shape, generator=self.gen, dtype=g.dtype)
            grads[p] = g
        return loss.item(), grads

    def commit(self) -> None:
        self.opt.step()


class SplitNN:
    """The protocol: ``parties`` (the bottom models in this process, one of them may belong to
    the label party) and the ``label`` party, every message through ``channel``; a party of
    ``label.dims`` not in ``parties`` must be an endpoint of the channel (another process)."""

    def __init__(self, parties: list[BottomParty], label: LabelParty, channel: Channel | None = None):
        self.parties, self.label, self.channel = parties, label, channel or Channel()
        for p in parties:
            self.channel.attach(p.name, p)
        if any(p.name not in label.dims for p in parties) or set(label.dims) - set(self.channel.parties):
            raise ValueError("split: every party needs a bottom model here or an endpoint on the "
                             "channel, and the label party's dims must name them all")

    def _embeddings(self, rows: torch.Tensor, train: bool) -> dict:
        ask, lab = self.channel.ask, self.label.name
        return {p: ask(lab, p, "rows" if train else "eval_rows", rows, "embedding") for p in self.label.dims}

    def step(self, rows: torch.Tensor) -> float:
        self.channel.begin_step()
        loss, grads = self.label.train_step(rows, self._embeddings(rows, True))
        for p in sorted(self.label.dims, key=lambda p: p == self.label.name):  # its own last:
            self.channel.ask(self.label.name, p, "gradient", grads[p])       # all or nothing
        self.label.commit()
        return loss

    def fit(self, batches) -> list[float]:
        return [self.step(rows) for rows in batches]

    def predict(self, rows: torch.Tensor) -> torch.Tensor:
        """The top model's output for ``rows`` (embeddings cross, no gradient does)."""
        return self.label.top_output(self._embeddings(rows, False), len(rows))


class JoinedModel(nn.Module):
    """The centralised equivalent: the bottom models side by side on their column blocks of the
    joined table, then the top model."""

    def __init__(self, bottoms: list[nn.Module], columns: list[slice], top: nn.Module):
        super().__init__()
        self.bottoms, self.columns, self.top = nn.ModuleList(bottoms), columns, top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(torch.cat([b(x[:, c]) for b, c in zip(self.bottoms, self.columns)], 1))


def batches(n: int, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Seeded shuffled mini-batches of row positions, ``epochs`` passes over ``n`` rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        out += list(perm.split(batch_size))
    return out
