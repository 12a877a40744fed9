"""Bit packing: unsigned integers of ``b`` bits each, packed densely into bytes.

``pack(values, b)`` writes value ``i`` into bits ``[i*b, (i+1)*b)`` of the output, least
significant bit first (bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``), so ``n``
values take exactly ``ceil(n * b / 8)`` bytes. ``unpack(packed, b, n)`` inverts it. Both are
vectorised tensor code (no Python loop over values); ``tests/codecs`` checks them against a
bit-by-bit Python reference.
"""
from __future__ import annotations

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
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((v[:, None] >> shifts) & 1).reshape(-1)  # (n * bits,) LSB first
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` values (int64) packed by ``pack(values, bits)``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(n, bits):
        raise ValueError(f"unpack: expected {packed_size(n, bits)} uint8 bytes for {n} values "
                         f"of {bits} bits, got {packed.numel()} {packed.dtype}")
    b = packed.reshape(-1).to(torch.int64)
    stream = ((b[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: n * bits]
    return (stream.reshape(n, bits) << torch.arange(bits, dtype=torch.int64)).sum(dim=1)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
