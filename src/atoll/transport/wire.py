"""The only code that turns trees into bytes and back.

Format (little-endian), version 1::

    b"ATL" | u8 version | u32 entry count
    per entry: u16 name length | name (utf-8) | u8 dtype code | u8 ndim | u32 * ndim shape
    then each tensor's raw bytes, in entry order

Every payload, in simulation as in deployment, goes through ``dumps``/``loads``, so the byte
counts in the metrics are those of real messages. ``loads`` validates everything it reads and
raises ``WireError`` naming what is wrong; it never returns a partly decoded tree.
"""
from __future__ import annotations

import struct

import torch

from atoll.tree import Tree

MAGIC = b"ATL"
VERSION = 1
DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.bool, torch.complex64, torch.complex128,
    torch.uint16, torch.uint32, torch.uint64,
]
CODE = {d: i for i, d in enumerate(DTYPES)}


class WireError(ValueError):
    """A message that cannot be decoded."""


def dumps(tree: Tree) -> bytes:
    """Serialise a tree of tensors to bytes."""
    head = [MAGIC, struct.pack("<BI", VERSION, len(tree))]
    body = []
    for name, t in tree.items():
        if t.dtype not in CODE:
            raise WireError(f"entry {name!r}: dtype {t.dtype} is not supported on the wire")
        raw = name.encode()
        head.append(struct.pack("<H", len(raw)) + raw)
        head.append(struct.pack(f"<BB{t.dim()}I", CODE[t.dtype], t.dim(), *t.shape))
        body.append(_raw_bytes(t))
    return b"".join(head + body)


def loads(data: bytes, max_bytes: int | None = None) -> Tree:
    """Deserialise bytes made by ``dumps``; raises ``WireError`` on anything malformed."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    view = memoryview(data)
    if bytes(view[:3]) != MAGIC:
        raise WireError("not an atoll message (bad magic bytes)")
    pos, (version, count) = _unpack(view, 3, "<BI")
    if version != VERSION:
        raise WireError(f"wire version {version} is not supported (this build reads {VERSION})")
    specs = []
    for _ in range(count):
        pos, (n,) = _unpack(view, pos, "<H")
        name = bytes(view[pos:pos + n]).decode(errors="replace")
        pos, (code, ndim) = _unpack(view, pos + n, "<BB")
        pos, shape = _unpack(view, pos, f"<{ndim}I")
        if code >= len(DTYPES):
            raise WireError(f"entry {name!r}: unknown dtype code {code}")
        specs.append((name, DTYPES[code], shape))
    tree = {}
    for name, dtype, shape in specs:
        nbytes = _numel(shape) * _itemsize(dtype)
        if pos + nbytes > len(view):
            raise WireError(f"entry {name!r}: message truncated ({len(view) - pos} of {nbytes} bytes)")
        tree[name] = _from_bytes(view[pos:pos + nbytes], dtype, shape)
        pos += nbytes
    if pos != len(view):
        raise WireError(f"{len(view) - pos} unexpected trailing bytes")
    return tree


def _unpack(view, pos, fmt):
    size = struct.calcsize(fmt)
    if pos + size > len(view):
        raise WireError("message truncated in header")
    return pos + size, struct.unpack_from(fmt, view, pos)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_bytes(buf, dtype, shape) -> torch.Tensor:
    if _numel(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)
