"""``stochastic_quantize(bits)``: unbiased ``b``-bit stochastic rounding of a whole update.

The update (all leaves, flattened) is mapped onto ``L = 2^b - 1`` equal steps of
``[-s, s]``, ``s = max |x|`` (sent as one float32); each coordinate rounds up with probability
equal to its fractional position, so ``E[decode(encode(x))] = x``, and the index is sent
bit-packed at ``b`` bits. Payload: ``{"q": packed, "scale": (1,) float32, "leaf/<name>":
dtype code and shape}``; ``ceil(d * b / 8)`` bytes plus a few dozen. It is the "separate
quantizer" that follows Gaussian noise in the privacy comparison (``bench/privacy_figures.py``):
post-processing, no privacy event of its own.
"""
from __future__ import annotations

import math

import torch

from atoll import rng
from atoll.codecs import bits as B
from atoll.codecs.base import Codec
from atoll.transport.wire import CODE, DTYPES


def stochastic_quantize(bits: int) -> Codec:
    """Unbiased stochastic rounding to ``2^bits`` levels on ``[-max|x|, max|x|]``."""
    if not 1 <= int(bits) <= 16 or int(bits) != bits:
        raise ValueError(f"stochastic_quantize: bits must be an integer in [1, 16], got {bits}")
    levels = 2 ** int(bits) - 1

    def encode(tree, state, key):
        flat = torch.cat([v.reshape(-1).to(torch.float64) for v in tree.values()])
        top = float(flat.abs().max()) if flat.numel() else 0.0
        scale = torch.tensor([top], dtype=torch.float32)
        if float(scale[0]) < top:  # round the float32 scale up: every |x| <= s, no clamping bias
            scale = torch.nextafter(scale, torch.tensor([math.inf], dtype=torch.float32))
        s = max(float(scale[0]), 1e-30)
        y = (flat / s + 1.0) * (levels / 2)  # in [0, L]
        low = torch.floor(y)
        up = torch.rand(flat.shape, generator=rng.generator(key), dtype=torch.float64) < (y - low)
        idx = (low + up.to(torch.float64)).clamp(0, levels).to(torch.int64)
        payload = {"q": B.pack(idx, int(bits)), "scale": scale}
        for name, t in tree.items():
            payload[f"leaf/{name}"] = torch.tensor([CODE[t.dtype], *t.shape], dtype=torch.int64)
        return payload, state

    def decode(payload):
        try:
            leaves = [(n[5:], payload[n].tolist()) for n in payload if n.startswith("leaf/")]
            s = float(payload["scale"][0])
            d = sum(math.prod(spec[1:]) for _, spec in leaves)
            idx = B.unpack(payload["q"], int(bits), d)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"stochastic_quantize payload is missing {exc}") from exc
        flat = (idx.to(torch.float64) * (2.0 / levels) - 1.0) * s
        out, i = {}, 0
        for name, (code, *shape) in leaves:
            n = math.prod(shape)
            out[name] = flat[i:i + n].reshape(shape).to(DTYPES[code])
            i += n
        return out

    return Codec(f"stochastic_quantize({bits})", init=lambda tree: (), encode=encode,
                 decode=decode, linear=False, unbiased=True)
