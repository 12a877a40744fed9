"""What the compressing codecs share: one flat vector in, shape records in the payload, back out.

Chain convention. A compressing codec with prefix ``p`` compresses every floating-point entry of
its input that holds values (``numel > 0``) and passes every other entry through unchanged: the
index streams, seeds and shape records written by codecs earlier in a chain. In the payload each
compressed entry ``name`` is replaced, where it stood, by its shape record ``p:name``: an EMPTY
tensor of shape ``(0, *shape)`` and the entry's dtype, so a record costs only its wire header
(no data bytes). The codec's own data follow as ``p/...`` entries. So
``chain(top_k(0.01), stochastic_quantize(4))`` quantises top-k's values ``topk/v`` and leaves
its index stream ``topk/q`` alone, and decoding restores names, order, shapes and dtypes.

Decoding bytes from the wire: a shape record is free to send and claims any size, so a server
decodes inside ``coordinate_limit(n)`` (``runtime.check``), and ``size`` refuses records that
claim more than ``n`` coordinates (the model's) before any codec allocates for them.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch

from atoll.tree import Tree
from atoll.wireformat import HEADER_BYTES


def gather(tree: Tree, prefix: str, what: str) -> tuple[torch.Tensor, Tree]:
    """``(vector, payload)``: the dense floating entries concatenated in order (promoted dtype)
    and the payload so far (records in their place, everything else passed through)."""
    clash = [k for k in tree if k.startswith((prefix + ":", prefix + "/"))]
    if clash:
        raise ValueError(f"{what}: the input already has an entry {clash[0]!r} of prefix {prefix!r} "
                         "(is the same codec twice in a chain?)")
    out, parts, dtype = {}, [], None
    for k, v in tree.items():
        if v.is_floating_point() and v.numel() > 0:
            out[f"{prefix}:{k}"] = v.new_empty((0, *v.shape))
            parts.append(v.detach().reshape(-1))
            dtype = v.dtype if dtype is None else torch.promote_types(dtype, v.dtype)
        else:
            out[k] = v
    vec = torch.cat([p.to(dtype) for p in parts]) if parts else torch.zeros(0)
    return vec, out


_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("atoll_coordinates", default=None)


@contextlib.contextmanager
def coordinate_limit(n: int):
    """Within this block (this thread), a payload may not claim more than ``n`` coordinates."""
    token = _LIMIT.set(n)
    try:
        yield
    finally:
        _LIMIT.reset(token)


def check_limit(d: int, what: str) -> int:
    """``d``, or a ValueError if it exceeds the current ``coordinate_limit``."""
    limit = _LIMIT.get()
    if limit is not None and d > limit:
        raise ValueError(f"{what} payload claims {d} coordinates, more than the model's {limit}")
    return d


def size(payload: Tree, prefix: str) -> int:
    """Coordinates recorded by the codec of ``prefix`` (the length of its flat vector), at most
    the current ``coordinate_limit``."""
    d = sum(math.prod(v.shape[1:]) for k, v in payload.items() if k.startswith(prefix + ":"))
    return check_limit(d, prefix)


def scatter(payload: Tree, prefix: str, vec: torch.Tensor, what: str) -> Tree:
    """Inverse of ``gather``: records replaced by slices of ``vec`` (original shape and dtype),
    the codec's ``p/...`` entries dropped, everything else passed through in order."""
    out, i = {}, 0
    for k, v in payload.items():
        if k.startswith(prefix + ":"):
            if v.dim() == 0 or v.shape[0] != 0:
                raise ValueError(f"{what} payload: shape record {k!r} must have a leading 0 dimension")
            n = math.prod(v.shape[1:])
            if i + n > vec.numel():
                raise ValueError(f"{what} payload: records cover more than the {vec.numel()} coordinates")
            out[k[len(prefix) + 1:]] = vec[i:i + n].reshape(v.shape[1:]).to(v.dtype)
            i += n
        elif not k.startswith(prefix + "/"):
            out[k] = v
    if i != vec.numel():
        raise ValueError(f"{what} payload: records cover {i} coordinates, the data {vec.numel()}")
    return out


def entry(payload: Tree, name: str, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``payload[name]``, or a ValueError naming the missing or mistyped entry."""
    if name not in payload:
        raise ValueError(f"{what} payload is missing the entry {name!r}")
    t = payload[name]
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{what} payload: entry {name!r} must be {dtype}, got {t.dtype}")
    return t


def wire_size(tree: Tree) -> int:
    """``len(wire.dumps(tree))``, computed from the format without serialising."""
    total = HEADER_BYTES
    for name, t in tree.items():
        total += 2 + len(name.encode()) + 2 + 4 * t.dim() + t.numel() * t.element_size()
    return total


def kept(fraction: float, d: int) -> int:
    """Coordinates kept by a sparsifier: ``max(1, round(fraction * d))`` (0 when ``d == 0``)."""
    return min(d, max(1, round(fraction * d))) if d else 0


def check_fraction(fraction: float, what: str) -> None:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"{what}: fraction must be in (0, 1], got {fraction!r}")
