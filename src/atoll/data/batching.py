"""Mini-batch index plans as tensors (no per-sample Python objects).

A plan is a LongTensor ``(S, B)`` of sample indices: each epoch is a fresh permutation of
``range(n)`` drawn from the given ``torch.Generator``, cut into ``ceil(n / B)`` batches, the last
padded with -1. Epochs are laid back to back, so a plan of ``steps`` batches is a prefix of any
longer plan from the same generator state, and ``steps = num_steps(n, B, E)`` reproduces the
plan for ``epochs = E`` exactly.
"""
from __future__ import annotations

import math

import torch


def num_steps(n: int, batch_size: int, epochs: int) -> int:
    """``epochs * ceil(n / batch_size)``; 0 when ``n == 0``."""
    return epochs * math.ceil(n / batch_size) if n > 0 else 0


def batch_indices(n: int, batch_size: int, *, epochs: int | None = None, steps: int | None = None,
                  generator: torch.Generator) -> torch.Tensor:
    """Index plan ``(S, B)``; give exactly one of ``epochs`` and ``steps``.

    With ``n == 0`` no draws are made and every entry is -1 (``S = steps``, or 0 for epochs).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("batch_indices: give exactly one of epochs and steps")
    if batch_size < 1 or (epochs or 0) < 0 or (steps or 0) < 0:
        raise ValueError(f"batch_indices: need batch_size >= 1 and epochs/steps >= 0, got "
                         f"batch_size={batch_size}, epochs={epochs}, steps={steps}")
    per_epoch = math.ceil(n / batch_size)
    if n == 0:
        return torch.full((steps or 0, batch_size), -1, dtype=torch.long)
    total = epochs * per_epoch if epochs is not None else steps
    n_epochs = math.ceil(total / per_epoch)
    pad = torch.full((per_epoch * batch_size - n,), -1, dtype=torch.long)
    plans = [torch.cat([torch.randperm(n, generator=generator), pad]) for _ in range(n_epochs)]
    if not plans:
        return torch.empty((0, batch_size), dtype=torch.long)
    return torch.cat(plans).view(-1, batch_size)[:total]


def gather(x: torch.Tensor, y: torch.Tensor,
           idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xb (S, B, *F), yb (S, B), mask (S, B))``; padded slots (-1) read sample 0 and are
    masked out. With no samples, ``xb`` and ``yb`` are zeros and the mask is all False."""
    mask = idx >= 0
    if y.shape[0] == 0:
        return (x.new_zeros((*idx.shape, *x.shape[1:])), y.new_zeros(idx.shape),
                torch.zeros(idx.shape, dtype=torch.bool))
    safe = idx.clamp(min=0)
    return x[safe], y[safe], mask
