"""Bit packing: unsigned integers of ``b`` bits each, packed densely into bytes.

``pack(values, b)`` writes value ``i`` into bits ``[i*b, (i+1)*b)`` of the output, least
significant bit first (bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``), so ``n``
values take exactly ``ceil(n * b / 8)`` bytes. ``unpack(packed, b, n)`` inverts it. Both are
vectorised (no Python loop over values): widths dividing 8 or multiples of 8 shift whole values
or bytes, other widths go through ``numpy.packbits``; ``tests/codecs`` checks them against a
bit-by-bit Python reference.
"""
from __future__ import annotations

import numpy as np
import torch

MAX_BITS = 62


def packed_size(n: int, bits: int) -> int:
    """Bytes used by ``n`` values of ``bits`` bits."""
    return (n * bits + 7) // 8


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the 1-D non-negative integer tensor ``values`` (each ``< 2**bits``) into uint8."""
    _check_bits(bits)
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"pack: values must lie in [0, 2**{bits}), got [{int(v.min())}, {int(v.max())}]")
    if 8 % bits == 0:  # whole values per byte: shift them into place and add
        per = 8 // bits
        v = torch.cat([v, v.new_zeros(-v.numel() % per)]).reshape(-1, per)
        return (v << torch.arange(0, 8, bits)).sum(dim=1).to(torch.uint8)
    if bits % 8 == 0:  # whole bytes per value
        return ((v[:, None] >> torch.arange(0, bits, 8)) & 255).to(torch.uint8).reshape(-1)
    stream = ((v[:, None] >> torch.arange(bits)) & 1).to(torch.uint8)  # (n, bits) LSB first
    return torch.from_numpy(np.packbits(stream.reshape(-1).numpy(), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` values (int64) packed by ``pack(values, bits)``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(n, bits):
        raise ValueError(f"unpack: expected {packed_size(n, bits)} uint8 bytes for {n} values "
                         f"of {bits} bits, got {packed.numel()} {packed.dtype}")
    b = packed.reshape(-1).to(torch.int64)
    if 8 % bits == 0:
        return ((b[:, None] >> torch.arange(0, 8, bits)) & ((1 << bits) - 1)).reshape(-1)[:n]
    if bits % 8 == 0:
        return (b.reshape(n, bits // 8) << torch.arange(0, bits, 8)).sum(dim=1)
    stream = np.unpackbits(packed.reshape(-1).numpy(), bitorder="little")[: n * bits]
    return (torch.from_numpy(stream).to(torch.int64).reshape(n, bits) << torch.arange(bits)).sum(dim=1)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
