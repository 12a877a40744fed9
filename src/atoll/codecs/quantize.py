"""Quantizing codecs: fewer bits per coordinate.

``cast(dtype)``: every value rounded to ``float16`` or ``bfloat16`` (round to nearest; values
beyond the format's range are clamped to its largest finite value). 2 bytes a coordinate.

``stochastic_quantize(bits, bucket=512)`` (QSGD, Alistarh et al. 2017, with a max-norm scale):
the flat vector is cut into buckets of ``bucket`` coordinates; bucket ``j`` with scale
``s_j = max |x_i|`` gets the grid of ``L + 1 = 2**bits`` levels ``-s_j + l * 2 s_j / L``
(``l = 0..L``) and each coordinate is rounded to one of its two neighbouring levels at random,
with probabilities that make the expectation exact: ``E[decode(encode(x))] = x`` (unbiased).
The variance of one coordinate is at most ``(s_j / L)**2``. Payload: the level indices
bit-packed at ``bits`` each (``sq/q``) and the scales as float32 (``sq/s``, rounded up so that
no coordinate leaves its grid): ``ceil(d * bits / 8) + 4 * ceil(d / bucket)`` bytes.
"""
from __future__ import annotations

import math

import torch

from atoll import rng
from atoll.codecs import bits as B
from atoll.codecs import flat
from atoll.codecs.base import Codec

CASTS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def cast(dtype: str | torch.dtype = "float16") -> Codec:
    """Send every floating value as ``float16`` or ``bfloat16``."""
    dt = CASTS.get(dtype) if isinstance(dtype, str) else dtype
    if dt not in CASTS.values():
        raise ValueError(f"cast: dtype must be one of {sorted(CASTS)}, got {dtype!r}")
    name = f"cast({str(dt).removeprefix('torch.')})"
    big = torch.finfo(dt).max

    def encode(tree, state, key):
        vec, out = flat.gather(tree, "cast", name)
        out["cast/v"] = vec.clamp(-big, big).to(dt)
        return out, state

    def decode(payload):
        v = flat.entry(payload, "cast/v", name, dt)
        return flat.scatter(payload, "cast", v, name)

    return Codec(name, init=lambda tree: (), encode=encode, decode=decode, linear=False, unbiased=False)


def stochastic_quantize(bits: int, bucket: int = 512) -> Codec:
    """Unbiased stochastic rounding to ``2**bits`` levels per bucket of ``bucket`` coordinates."""
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ValueError(f"stochastic_quantize: bits must be an integer in [1, 16], got {bits!r}")
    if not (isinstance(bucket, int) and bucket >= 1):
        raise ValueError(f"stochastic_quantize: bucket must be an integer >= 1, got {bucket!r}")
    name = f"stochastic_quantize({bits},{bucket})"
    top = (1 << bits) - 1  # L: the highest level index

    def encode(tree, state, key):
        vec, out = flat.gather(tree, "sq", name)
        work = torch.float64 if vec.dtype == torch.float64 else torch.float32
        d = vec.numel()
        x = _buckets(vec.to(work), bucket)
        s = x.abs().amax(dim=1) if d else x.new_zeros(0)
        s32 = s.to(torch.float32)
        s32 = torch.where(s32.to(work) < s, torch.nextafter(s32, torch.tensor(math.inf)), s32)
        scale = torch.where(s32 > 0, s32.to(work), torch.ones((), dtype=work))[:, None]
        u = ((x / scale + 1) * (top / 2)).reshape(-1)[:d]
        lo = torch.floor(u)
        noise = torch.rand(d, generator=rng.generator(rng.fold(key, "sq")), dtype=work)
        q = (lo + (noise < u - lo).to(work)).clamp(0, top).to(torch.int64)
        out["sq/q"] = B.pack(q, bits)
        out["sq/s"] = s32
        return out, state

    def decode(payload):
        d = flat.size(payload, "sq")
        s = flat.entry(payload, "sq/s", name, torch.float32)
        if s.numel() != -(-d // bucket):
            raise ValueError(f"{name} payload: {s.numel()} scales for {d} coordinates "
                             f"(buckets of {bucket}: expected {-(-d // bucket)})")
        q = B.unpack(flat.entry(payload, "sq/q", name, torch.uint8), bits, d)
        levels = _buckets(q.to(torch.float64), bucket)
        x = (levels * (2 / top) - 1) * s.to(torch.float64)[:, None]
        return flat.scatter(payload, "sq", x.reshape(-1)[:d], name)

    return Codec(name, init=lambda tree: (), encode=encode, decode=decode, linear=False, unbiased=True)


def _buckets(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """``x`` (``d``,) zero-padded to whole buckets, shaped ``(ceil(d / bucket), bucket)``."""
    return torch.cat([x, x.new_zeros(-x.numel() % bucket)]).reshape(-1, bucket)
