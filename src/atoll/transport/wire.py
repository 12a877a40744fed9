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

import ctypes
import struct

import numpy as np
import torch

from atoll.tree import Tree
from atoll.wireformat import CODE, DTYPES, MAGIC, VERSION


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
    specs, pos = _read_header(view)
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


def spans(data: bytes) -> list[tuple[list, int, int]]:
    """The messages of ``data``, several ``dumps`` outputs one after the other: for each, its
    entries ``[(name, dtype, shape)]`` and its byte range ``(start, end)``. Read from the headers
    alone (nothing is allocated), so a caller can check them before ``loads`` of each range."""
    view, pos, out = memoryview(data), 0, []
    while pos < len(view):
        specs, end = _read_header(view[pos:])
        end += pos + sum(_numel(shape) * _itemsize(dtype) for _, dtype, shape in specs)
        if end > len(view):
            raise WireError(f"message {len(out) + 1}: truncated ({len(view) - pos} bytes left, "
                            f"its header announces {end - pos})")
        out.append((specs, pos, end))
        pos = end
    return out


def _read_header(view) -> tuple[list, int]:
    """``([(name, dtype, shape)], end of the header)``, validated."""
    if bytes(view[:3]) != MAGIC:
        raise WireError("not an atoll message (bad magic bytes)")
    pos, (version, count) = _unpack(view, 3, "<BI")
    if version != VERSION:
        raise WireError(f"wire version {version} is not supported (this build reads {VERSION})")
    specs, seen = [], set()
    for _ in range(count):
        pos, (n,) = _unpack(view, pos, "<H")
        name = bytes(view[pos:pos + n]).decode(errors="replace")
        pos, (code, ndim) = _unpack(view, pos + n, "<BB")
        pos, shape = _unpack(view, pos, f"<{ndim}I")
        if code >= len(DTYPES):
            raise WireError(f"entry {name!r}: unknown dtype code {code}")
        if name in seen:
            raise WireError(f"entry {name!r} appears twice")
        seen.add(name)
        specs.append((name, DTYPES[code], shape))
    return specs, pos


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


# --- many messages of one structure ----------------------------------------------------------

ALIGN = 64  # bytes: ``Rows`` starts every message body on this boundary


class Layout:
    """The bytes that every message of one tree structure shares (names, dtypes, shapes).

    The clients of a round send messages of one structure: the same header bytes, each entry
    at the same offset. ``rows(n)`` lays out ``n`` such messages in one buffer with every
    entry viewable as an ``(n, *shape)`` tensor, so a batched computation writes its results
    straight into the messages; ``stack(messages)`` decodes messages into ``(n, *shape)``
    tensors. Invariants (tests/core/test_wire.py): a message written through ``Rows`` is byte
    for byte what ``dumps`` writes for the same tree, and ``matches`` accepts a message exactly
    when ``loads`` decodes it to this structure (same header bytes, same length), after which
    ``stack`` returns what ``loads`` returns.
    """

    def __init__(self, specs):
        specs = [(name, dtype, tuple(int(s) for s in shape)) for name, dtype, shape in specs]
        head = [MAGIC, struct.pack("<BI", VERSION, len(specs))]
        for name, dtype, shape in specs:
            if dtype not in CODE:
                raise WireError(f"entry {name!r}: dtype {dtype} is not supported on the wire")
            raw = name.encode()
            head += [struct.pack("<H", len(raw)), raw,
                     struct.pack(f"<BB{len(shape)}I", CODE[dtype], len(shape), *shape)]
        self.header = b"".join(head)
        self.entries, pos = {}, len(self.header)
        for name, dtype, shape in specs:
            nbytes = _numel(shape) * _itemsize(dtype)
            self.entries[name] = (dtype, shape, pos, nbytes)
            pos += nbytes
        self.size = pos                                   # bytes of one message
        self.pad = -len(self.header) % ALIGN              # in a row, before the message
        self.stride = -(-(self.pad + self.size) // ALIGN) * ALIGN

    @classmethod
    def of(cls, tree: Tree) -> Layout:
        return cls([(k, v.dtype, v.shape) for k, v in tree.items()])

    @classmethod
    def parse(cls, message) -> Layout:
        """The layout of ``message``'s header (validated as ``loads`` validates it)."""
        return cls(_read_header(memoryview(message))[0])

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self.header == other.header

    def __hash__(self) -> int:
        return hash(self.header)

    def matches(self, message) -> bool:
        return len(message) == self.size and message[:len(self.header)] == self.header

    def rows(self, n: int, buffer: torch.Tensor | None = None) -> Rows:
        return Rows(self, n, buffer)

    def stack(self, messages: list, buffer: torch.Tensor | None = None) -> dict:
        """Every entry of ``messages`` (each must ``match``) as one ``(n, *shape)`` tensor.

        Messages that are equally spaced in one writable buffer (those of ``Rows``) are read in
        place: the tensors view the messages' memory. Others are copied into rows of ``buffer``
        (uint8, reused when large enough) or of a new buffer."""
        for i, m in enumerate(messages):
            if not self.matches(m):
                raise WireError(f"message {i} does not have the layout of the others")
        grid, base = _in_place(messages, self.size)
        if grid is None:
            rows = Rows(self, len(messages), buffer, header=False)
            dst = rows.grid.numpy()
            for i, m in enumerate(messages):
                dst[i] = np.frombuffer(m, dtype=np.uint8)
            grid, base = rows.grid, rows.grid.data_ptr()
        out = {}
        for name, (dtype, shape, off, nbytes) in self.entries.items():
            view = _entry(grid, base, dtype, shape, off, nbytes)
            out[name] = view if view is not None else _copy_entry(grid, dtype, shape, off, nbytes)
        return out


class Rows:
    """``n`` messages of one ``Layout`` in one buffer, each body on an ``ALIGN`` boundary.

    ``messages[i]`` is message ``i`` (a memoryview); ``views[name]`` is entry ``name`` of all
    ``n`` messages as an ``(n, *shape)`` tensor to write into (None for an entry not aligned to
    its dtype: write it with ``fill``). The header is written once, for all rows."""

    def __init__(self, layout: Layout, n: int, buffer: torch.Tensor | None = None,
                 header: bool = True):
        self.layout, need = layout, n * layout.stride + ALIGN
        raw = buffer if buffer is not None and buffer.numel() >= need else \
            torch.empty(need, dtype=torch.uint8)
        shift = -raw.data_ptr() % ALIGN
        rows = raw[shift:shift + n * layout.stride].view(n, layout.stride)
        self.grid = rows[:, layout.pad:layout.pad + layout.size]  # (n, size): the messages
        if header:
            self.grid[:, :len(layout.header)] = torch.frombuffer(bytearray(layout.header),
                                                                 dtype=torch.uint8)
        self.raw = raw
        self.views = {name: _entry(self.grid, self.grid.data_ptr(), dtype, shape, off, nbytes)
                      for name, (dtype, shape, off, nbytes) in layout.entries.items()}
        flat, start = memoryview(raw.numpy()), shift + layout.pad
        self.messages = [flat[start + i * layout.stride:start + i * layout.stride + layout.size]
                         for i in range(n)]

    def fill(self, name: str, values: torch.Tensor, start: int = 0) -> None:
        """Write ``values`` ``(k, *shape)`` as entry ``name`` of messages ``start .. start+k-1``
        (nothing to do where ``values`` already is that part of the buffer)."""
        dtype, shape, off, nbytes = self.layout.entries[name]
        k = values.shape[0]
        if values.dtype != dtype or tuple(values.shape[1:]) != shape:
            raise WireError(f"entry {name!r}: got {tuple(values.shape[1:])} {values.dtype}, the "
                            f"layout has {shape} {dtype}")
        view = self.views[name]
        if view is None:
            raw = values.detach().cpu().contiguous().view(torch.uint8).reshape(k, nbytes)
            self.grid[start:start + k, off:off + nbytes].copy_(raw)
            return
        dst = view[start:start + k]
        if dst.data_ptr() != values.data_ptr() or dst.stride() != values.stride():
            dst.copy_(values.detach())


def _entry(grid: torch.Tensor, address: int, dtype, shape, off: int, nbytes: int):
    """Entry bytes ``[off, off + nbytes)`` of every row of ``grid`` (uint8, at ``address``)
    viewed as ``(n, *shape)`` of ``dtype``, or None where it is not aligned to the dtype."""
    size = _itemsize(dtype)
    if (address + off) % size or grid.stride(0) % size:
        return None
    return grid[:, off:off + nbytes].view(dtype).view(grid.shape[0], *shape)


def _copy_entry(grid: torch.Tensor, dtype, shape, off: int, nbytes: int) -> torch.Tensor:
    """Entry bytes ``[off, off + nbytes)`` of every row of ``grid``, copied to an aligned tensor."""
    out = torch.empty((grid.shape[0], *shape), dtype=dtype)
    if out.numel():
        out.view(grid.shape[0], -1).view(torch.uint8).copy_(grid[:, off:off + nbytes])
    return out


def _in_place(messages: list, size: int):
    """``(n, size)`` uint8 rows viewing ``messages`` where they are equally spaced memoryviews
    of one writable buffer, with the address of row 0; else ``(None, None)``."""
    if not messages or any(type(m) is not memoryview for m in messages):
        return None, None
    base = messages[0].obj
    try:
        if any(m.obj is not base for m in messages):
            return None, None
        at = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in messages]
        whole = np.frombuffer(base, dtype=np.uint8)
    except (TypeError, ValueError):  # read-only, not contiguous, not bytes
        return None, None
    step = at[1] - at[0] if len(at) > 1 else -(-size // ALIGN) * ALIGN  # any, for one row
    start = at[0] - whole.ctypes.data
    if step < size or any(b - a != step for a, b in zip(at, at[1:])) or start < 0 \
            or start + step * (len(at) - 1) + size > whole.size:
        return None, None
    flat = torch.from_numpy(whole)
    return flat.as_strided((len(at), size), (step, 1), start), at[0]
