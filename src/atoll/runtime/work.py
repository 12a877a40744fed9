"""A round's local work as tensors: per-client draws, chunks, padded chunk batches.

Invariants:

* ``plan_clients`` makes exactly the draws of ``base.client_work`` with the same keys
  ``rng.key(seed, round, client, ...)``: per epoch one ``randperm(n)`` from the client's
  "batches" generator, and the straggler coin from its "straggler" generator. So every runtime
  trains on the same samples in the same order (checked against ``client_work`` in
  ``tests/runtime/test_work.py``). Per client it only draws; the ``(S, B)`` index plans of a
  whole chunk are assembled by ``chunk_batches`` with a fixed number of tensor ops.
* ``chunk_batches`` pads a chunk to ``(C, S, B, ...)`` with the chunk's largest ``S``: padded
  steps have ``step_mask`` False, padded samples ``mask`` False (they read sample 0 of their
  client, as ``gather`` does), so they change nothing. Batching and padding are tensor ops once
  per chunk and round, never per step or per sample.
* ``cut_chunks`` orders clients by active steps, most first, so that in every chunk the active
  clients of step ``s`` are a leading block (step masks are prefixes, as in ``client_work``);
  then by samples, so that clients smaller than a batch fill fewer slots the further back.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from atoll import rng
from atoll.runtime.base import LocalWork
from atoll.sampling import straggler_steps

SMALL_CHUNK_BYTES = 4 * 2**20  # below this, a chunk's data is concatenated and gathered at once
_ZERO = torch.zeros(1, dtype=torch.long)  # the permutation of one sample (never written)


class ClientPlan(NamedTuple):
    """One sampled client's work this round."""

    pos: int                    # position in the cohort
    cid: int
    n: int                      # training samples
    steps: int                  # S: local steps of its full work
    active: int                 # k <= S: steps it completes (fewer if it straggles)
    straggler: bool
    perms: tuple                # one randperm(n) per epoch touched by the S steps


def plan_clients(cohort: list[int], data, r: int, seed: int, work: LocalWork) -> list[ClientPlan]:
    """The draws of every client of ``cohort`` (those of ``client_work``)."""
    B, plans = work.batch_size, []
    for pos, cid in enumerate(cohort):
        n = data.clients[cid].n
        total = work.round_steps(cid, r, seed, n)
        perms = ()
        if n == 1 and total > 0:  # randperm(1) is [0] whatever the generator
            perms = (_ZERO,) * total
        elif n > 0 and total > 0:
            g = rng.generator(rng.key(seed, r, cid, "batches"))
            perms = tuple(torch.randperm(n, generator=g) for _ in range(math.ceil(total / math.ceil(n / B))))
        k, straggler = straggler_steps(cid, r, seed, work, total)
        plans.append(ClientPlan(pos, cid, n, total, k, straggler, perms))
    return plans


def cut_chunks(plans: list[ClientPlan], max_clients: int) -> list[list[ClientPlan]]:
    """Chunks of at most ``max_clients``, clients sorted by (active steps, steps, samples)
    descending: the clients active at a step, or with a sample in a batch slot, lead."""
    order = sorted(plans, key=lambda p: (-p.active, -p.steps, -p.n, p.pos))
    size = max(1, max_clients)
    return [order[i:i + size] for i in range(0, len(order), size)]


def chunk_indices(chunk: list[ClientPlan], B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx (C, S, B), step_mask (C, S))``: each client's sample indices, -1 where padded.

    Client c's flat plan is its epochs' permutations laid back to back, each epoch padded to a
    multiple of ``B`` (``batch_indices``), cut after ``S_c`` steps."""
    C, S = len(chunk), max((p.steps for p in chunk), default=0)
    cols = torch.tensor([(p.n, p.steps, p.active, len(p.perms)) for p in chunk], dtype=torch.long)
    n, steps, active, epochs = cols.view(C, 4, 1).unbind(1)             # each (C, 1)
    span = ((n + B - 1) // B).clamp(min=1) * B                           # padded epoch length
    base = (n * epochs).cumsum(0) - n * epochs                           # start of c's perms
    q = torch.arange(S * B).unsqueeze(0)                                 # (1, S*B)
    epoch, off = q // span, q % span
    valid = (q < steps * B) & (off < n)
    flat = torch.cat([t for p in chunk for t in p.perms]) if any(p.perms for p in chunk) \
        else torch.zeros(1, dtype=torch.long)
    where = (base + epoch * n + off).clamp(max=flat.numel() - 1)
    idx = torch.where(valid, flat[where], -1).view(C, S, B)
    step_mask = torch.arange(S).unsqueeze(0) < active
    return idx, step_mask


def pooled(xs: list, ys: list):
    """``((X, Y), first rows (C,))`` when every client's samples are consecutive rows of one
    pair of tensors ``X``, ``Y`` (as ``data.build`` lays them out) and no client is empty;
    else None (``chunk_batches`` then concatenates the clients' tensors)."""
    px, py = xs[0]._base, ys[0]._base
    if px is None or py is None or px.dim() != xs[0].dim() or py.dim() != 1 \
            or not px.is_contiguous() or not py.is_contiguous():
        return None
    row = math.prod(px.shape[1:])
    starts = []
    for x, y in zip(xs, ys):
        if x._base is not px or y._base is not py or x.numel() == 0 \
                or x.shape[1:] != px.shape[1:] or not x.is_contiguous() or not y.is_contiguous():
            return None
        first, rest = divmod(x.storage_offset() - px.storage_offset(), row)
        if rest or first != y.storage_offset() - py.storage_offset():
            return None
        starts.append(first)
    return (px, py), torch.tensor(starts)


def chunk_batches(chunk: list[ClientPlan], clients, B: int, device="cpu") -> tuple[dict, torch.Tensor]:
    """``({"x": (C, S, B, *F), "y": (C, S, B), "mask": (C, S, B)}, step_mask (C, S))``."""
    idx, step_mask = chunk_indices(chunk, B)
    mask, safe = idx >= 0, idx.clamp(min=0)
    xs = [clients[p.cid].x for p in chunk]
    ys = [clients[p.cid].y for p in chunk]
    feat = xs[0].shape[1:]
    total = sum(p.n for p in chunk)
    pool = pooled(xs, ys)
    if pool is not None:  # one gather from the tensor that holds every client's rows
        (px, py), start = pool
        rows = (safe + start.view(-1, 1, 1)).reshape(-1)
        x, y = px.index_select(0, rows), py.index_select(0, rows)
    elif total * math.prod(feat) * xs[0].element_size() <= SMALL_CHUNK_BYTES:
        n = torch.tensor([p.n for p in chunk])
        start = torch.where(n == 0, total, n.cumsum(0) - n).view(-1, 1, 1)  # no data: zero row
        rows = (safe + start).reshape(-1)                                 # (C*S*B,)
        x = torch.cat(xs + [xs[0].new_zeros((1, *feat))])[rows]
        y = torch.cat(ys + [ys[0].new_zeros(1)])[rows]
    else:
        x = xs[0].new_empty((idx.numel(), *feat))
        y = ys[0].new_empty(idx.numel())
        per = idx[0].numel()
        for c, p in enumerate(chunk):
            rows = safe[c].reshape(-1)
            if p.n > 0:
                torch.index_select(xs[c], 0, rows, out=x[c * per:(c + 1) * per])
                torch.index_select(ys[c], 0, rows, out=y[c * per:(c + 1) * per])
            else:  # no data: zeros, all masked (as ``gather`` does)
                x[c * per:(c + 1) * per] = 0
                y[c * per:(c + 1) * per] = 0
    batches = {"x": x.view(*idx.shape, *feat).to(device), "y": y.view(idx.shape).to(device),
               "mask": mask.to(device)}
    return batches, step_mask.to(device)
