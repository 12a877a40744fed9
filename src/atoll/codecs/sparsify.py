"""Sparsifying codecs: send ``k = max(1, round(fraction * d))`` of the ``d`` coordinates.

``top_k(fraction)`` keeps the ``k`` largest in magnitude over the whole tree (one global
selection, not per leaf). Payload: the values ``topk/v`` (input dtype) and their sorted indices,
delta- and Rice-coded (``atoll.codecs.sparse_index``, about ``log2(d/k) + 2`` bits each).
Biased: pair it with ``error_feedback``.

``rand_k(fraction)`` keeps ``k`` coordinates drawn uniformly without replacement from the
client's key and multiplies them by ``d / k``, so ``E[decode(encode(x))] = x`` (unbiased; seed
004 [0118]-[0119]). Only the 8-byte index seed travels (``randk/seed``); the server regenerates
the indices from it. ``rand_k(fraction, masked=True)`` returns instead the dense tree with the
other coordinates zeroed (decode is the identity), to feed a linear codec that needs the full
coordinate space: ``chain(rand_k(0.1, masked=True), count_sketch(5, 20000))`` (US 2025/0265475 A1 [0122]).
"""
from __future__ import annotations

import torch

from atoll import rng
from atoll.codecs import flat, sparse_index
from atoll.codecs.base import Codec


def top_k(fraction: float) -> Codec:
    """Keep the ``k`` largest-magnitude coordinates; indices delta-coded."""
    flat.check_fraction(fraction, "top_k")
    name = f"top_k({fraction:g})"

    def encode(tree, state, key):
        vec, out = flat.gather(tree, "topk", name)
        k = flat.kept(fraction, vec.numel())
        idx = torch.topk(vec.abs(), k, sorted=False).indices.sort().values
        out.update(sparse_index.encode(idx, "topk"))
        out["topk/v"] = vec[idx]
        return out, state

    def decode(payload):
        d = flat.size(payload, "topk")
        v = flat.entry(payload, "topk/v", name)
        idx = sparse_index.decode(payload, "topk", v.numel(), d, name)
        return flat.scatter(payload, "topk", _scatter(d, idx, v), name)

    return Codec(name, init=lambda tree: (), encode=encode, decode=decode, linear=False, unbiased=False)


def rand_k(fraction: float, masked: bool = False) -> Codec:
    """Keep ``k`` uniformly random coordinates scaled by ``d / k``; only the index seed travels."""
    flat.check_fraction(fraction, "rand_k")
    name = f"rand_k({fraction:g}{',masked' if masked else ''})"

    def encode(tree, state, key):
        vec, out = flat.gather(tree, "randk", name)
        d = vec.numel()
        k = flat.kept(fraction, d)
        seed = rng.fold(key, "rand_k")
        idx = sample(seed, d, k)
        values = vec[idx] * (d / k) if k else vec[idx]
        if masked:
            return flat.scatter(out, "randk", _scatter(d, idx, values), name), state
        out["randk/seed"] = torch.tensor([seed], dtype=torch.int64)
        out["randk/v"] = values
        return out, state

    def decode(payload):
        if masked:
            return dict(payload)
        d = flat.size(payload, "randk")
        v = flat.entry(payload, "randk/v", name)
        seed = flat.entry(payload, "randk/seed", name, torch.int64)
        if seed.numel() != 1 or not 0 <= v.numel() <= d:
            raise ValueError(f"{name} payload: one seed and at most {d} values expected")
        return flat.scatter(payload, "randk", _scatter(d, sample(int(seed[0]), d, v.numel()), v), name)

    return Codec(name, init=lambda tree: (), encode=encode, decode=decode, linear=masked, unbiased=True)


def sample(seed: int, d: int, k: int) -> torch.Tensor:
    """``k`` distinct indices of ``[0, d)``, uniformly (sorted), from ``seed``.

    For ``k <= d / 4``: draw ``k + k/8 + 16`` uniform integers, keep the distinct ones (a uniform
    random subset of their number, by symmetry) and a uniform ``k`` of those; redraw in the
    rare case fewer than ``k`` are distinct. Costs ``O(k log k)`` instead of a permutation of
    all ``d`` (17 ms for ``d = 10^6`` here). Otherwise the first ``k`` of a permutation.
    """
    g = rng.generator(seed)
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    if 4 * k > d:
        return torch.randperm(d, generator=g)[:k].sort().values
    while True:
        cand = torch.unique(torch.randint(d, (k + k // 8 + 16,), generator=g))
        if cand.numel() >= k:
            return cand[torch.randperm(cand.numel(), generator=g)[:k]].sort().values


def _scatter(d: int, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = values.new_zeros(d)
    out[idx] = values
    return out
