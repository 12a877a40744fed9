"""A vertical-training message's payload between processes: a tensor as (dtype, shape, raw
little-endian bytes), raw bytes, or nothing (an acknowledgement).

``decode`` checks the dtype against a short list, the shape's spelling and that the bytes are
exactly what the shape needs before it makes a tensor (no unpickling, no allocation beyond the
bytes already received); what the receiver expects (dtype, shape, finiteness) is then checked by
the party itself (``channel.check_tensor``), as in one process.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from atoll.vertical.channel import PartyError

DTYPES = {"float64": "<f8", "float32": "<f4", "int64": "<i8"}
_SHAPE = re.compile(r"(\d{1,10}(,\d{1,10}){0,3})?")  # at most 4 dimensions


def encode(msg) -> tuple[str, str, bytes]:
    """``(dtype, shape, data)`` of a tensor, of bytes (``bytes``) or of None (``none``)."""
    if msg is None:
        return "none", "", b""
    if isinstance(msg, (bytes, bytearray)):
        return "bytes", "", bytes(msg)
    if not isinstance(msg, torch.Tensor):
        raise TypeError(f"vertical: cannot send a {type(msg).__name__}")
    name = str(msg.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"vertical: cannot send a {msg.dtype} tensor")
    arr = np.ascontiguousarray(msg.detach().cpu().numpy(), dtype=DTYPES[name])
    return name, ",".join(str(d) for d in msg.shape), arr.tobytes()


def decode(dtype: str, shape: str, data: bytes, party: str, name: str):
    """The payload ``encode`` made, or PartyError naming ``party`` and the field ``name``."""
    where = f"party {party!r}: field {name!r}"
    if dtype in ("none", "bytes"):
        if shape or (dtype == "none" and data):
            raise PartyError(f"{where}: a {dtype} payload with a shape or data")
        return None if dtype == "none" else bytes(data)
    if dtype not in DTYPES:
        raise PartyError(f"{where} has dtype {dtype[:20]!r}, expected one of {sorted(DTYPES)}")
    if not _SHAPE.fullmatch(shape):
        raise PartyError(f"{where} has a malformed shape {shape[:40]!r}")
    dims = [int(d) for d in shape.split(",")] if shape else []
    need = math.prod(dims) * np.dtype(DTYPES[dtype]).itemsize
    if need != len(data):
        raise PartyError(f"{where} has {len(data)} bytes, its shape {tuple(dims)} needs {need}")
    return torch.from_numpy(np.frombuffer(data, dtype=DTYPES[dtype]).reshape(dims).copy())
