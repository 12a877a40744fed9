"""Sorted coordinate indices, delta-coded and Rice-coded into two bit streams.

The ``k`` strictly increasing indices become gaps ``g_j = i_j - i_{j-1} - 1 >= 0``
(``i_{-1} = -1``). Each gap is split at a Rice parameter ``m`` into ``g >> m`` (unary: that many
1 bits then a 0) and ``g mod 2**m`` (``m`` plain bits). The unary parts of all gaps form one
stream and the remainders another, so both directions are vectorised: encoding scatters the
0 terminators at ``cumsum(q + 1) - 1``; decoding reads the quotients back as the distances
between the first ``k`` zeros of the unary stream. ``m`` is the one of seven candidates around
``log2(mean gap)`` that gives the fewest bits, exactly computed. Entries (``p`` a prefix):

* ``p/q``: unary stream, ``ceil((k + sum(g >> m)) / 8)`` bytes, padded with 1 bits (not
  terminators, so a payload claiming more or fewer than its ``k`` indices is refused);
* ``p/r``: remainders, ``ceil(k * m / 8)`` bytes;
* ``p/m``: ``m`` as one uint8.

For gaps near their mean this is about ``log2(d / k) + 2`` bits an index, against
``ceil(log2 d)`` for plain positions. ``k`` is not stored: the caller knows it (the values).
"""
from __future__ import annotations

import math

import torch

from atoll.codecs import bits as B


def gaps(idx: torch.Tensor) -> torch.Tensor:
    return torch.diff(idx, prepend=idx.new_full((1,), -1)) - 1


def rice_parameter(g: torch.Tensor) -> int:
    """The ``m`` (of seven around ``log2(mean gap)``) that minimises ``k * (m + 1) + sum(g >> m)``."""
    if g.numel() == 0:
        return 0
    mean = float(g.double().mean())
    centre = max(0, int(math.log2(mean + 1)))
    ms = torch.arange(max(0, centre - 3), min(B.MAX_BITS, centre + 4))
    cost = g.numel() * ms + (g[None, :] >> ms[:, None]).sum(dim=1)
    return int(ms[int(torch.argmin(cost))])


def encoded_size(idx: torch.Tensor) -> int:
    """Data bytes of ``encode(idx)`` (``q``, ``r`` and ``m``), without building the streams."""
    g = gaps(idx.to(torch.int64))
    m = rice_parameter(g)
    return B.packed_size(g.numel() + int((g >> m).sum()), 1) + B.packed_size(g.numel(), m) + 1


def encode(idx: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """The streams of strictly increasing non-negative indices ``idx`` (1-D)."""
    idx = idx.to(torch.int64)
    g = gaps(idx)
    if g.numel() and int(g.min()) < 0:
        raise ValueError("sparse_index.encode: indices must be strictly increasing and >= 0")
    m = rice_parameter(g)
    q = g >> m
    stream = torch.ones(B.packed_size(g.numel() + int(q.sum()), 1) * 8, dtype=torch.uint8)  # 1-padded
    stream[torch.cumsum(q + 1, 0) - 1] = 0
    rem = B.pack(g & ((1 << m) - 1), m) if m else torch.zeros(0, dtype=torch.uint8)
    return {f"{prefix}/q": B.pack(stream, 1), f"{prefix}/r": rem,
            f"{prefix}/m": torch.tensor([m], dtype=torch.uint8)}


def decode(payload: dict, prefix: str, k: int, d: int, what: str) -> torch.Tensor:
    """The ``k`` indices (int64) of ``encode``; checks they all lie in ``[0, d)``."""
    try:
        qs, rs, m = payload[f"{prefix}/q"], payload[f"{prefix}/r"], payload[f"{prefix}/m"]
    except KeyError as exc:
        raise ValueError(f"{what} payload is missing the index entry {exc}") from exc
    if any(t.dtype != torch.uint8 for t in (qs, rs, m)) or m.numel() != 1:
        raise ValueError(f"{what} payload: index entries must be uint8 (and {prefix}/m one value)")
    m = int(m[0])
    if not 0 <= m <= B.MAX_BITS:
        raise ValueError(f"{what} payload: Rice parameter {m} out of range")
    if not 0 <= k <= d:
        raise ValueError(f"{what} payload: {k} indices for {d} coordinates")
    # k indices below d have gaps summing to at most d - k: the unary stream is bounded
    if qs.numel() > B.packed_size(k + ((d - k) >> m), 1):
        raise ValueError(f"{what} payload: an index stream of {qs.numel()} bytes is longer than "
                         f"{k} indices below {d} can need")
    stream = B.unpack(qs, 1, qs.numel() * 8)
    zeros = torch.nonzero(stream == 0).reshape(-1)[:k]
    end = int(zeros[-1]) + 1 if k else 0  # after the k-th terminator only 1-padding may follow
    if zeros.numel() != k or B.packed_size(end, 1) != qs.numel() or not bool(stream[end:].all()):
        raise ValueError(f"{what} payload: the index stream does not hold exactly {k} indices")
    q = gaps(zeros)
    r = B.unpack(rs, m, k) if m else torch.zeros(k, dtype=torch.int64)
    idx = torch.cumsum((q << m) + r + 1, 0) - 1
    if k and int(idx[-1]) >= d:
        raise ValueError(f"{what} payload: index {int(idx[-1])} out of range for {d} coordinates")
    return idx
