"""DP intrinsic quantization (US 11,017,322 B1, FIG. 3 and FIG. 4): the quantizer *is* the noise.

Client (encode), for an update ``g`` of ``d`` coordinates and sample count ``N_k``:

1. clip ``g`` per coordinate to ``[-C, C]`` (``norm="linf"``) or to the L2 ball of radius ``C``
   (``norm="l2"``; also bounds every coordinate by ``C``);
2. step ``D_k = D / N_k``; privacy noise ``n = sum of Z uniforms on [-D_k/2, D_k/2]`` (drawn from
   the uplink key, which a deployed client keys with its own secret: ``rng.private_key``);
   dither ``v ~ Uniform[-D_k/2, D_k/2]`` drawn from a SEED (public: the server subtracts it);
3. integers ``m = round((g + n + v) / D_k)``, i.e. ``Q[g + n + v] = m * D_k``. With
   ``B = C + Z * D_k / 2`` (the patent's range) every ``|m| <= K = ceil(B / D_k)``;
4. send ``m + K`` bit-packed at ``ceil(log2(2K + 1))`` bits each, the dither seed (8 bytes, not
   ``d`` floats) and ``N_k``. (The patent counts ``M + 1 = ceil(2B/D_k) + 1`` levels; that equals
   ``2K + 1`` when ``B / D_k`` is an integer and is one level short otherwise, so we use ``2K + 1``.)

Server (decode): regenerate ``v`` from the seed and return ``m * D_k - v = g + n + e`` where the
quantization error ``e`` is uniform on ``[-D_k/2, D_k/2]`` and independent of ``g + n``
(subtractive dither): unbiased, with noise Irwin-Hall(``Z + 1``) x ``D_k``. Because
``N_k * D_k = D``, the sample-weighted sum is ``D * sum_k (m_k - u_k)`` with ``u_k = v_k / D_k``:
an integer sum (what secure aggregation adds) plus dithers the server knows
(``aggregate_integers``).

Privacy (``atoll.privacy.irwin_hall``): per-sample gradients clipped per coordinate to ``C`` and
the clipped *mean* ``g`` encoded with ``count = N_k`` give ``IrwinHallDpEvent(Z + 1, D, C, d, q)``;
pass ``dimension`` (and the Poisson rate ``sample_rate``) to declare it. Sending the realised
``N_k`` reveals the batch size, which that event does not cover; pass a public normaliser as
``count`` (e.g. the expected batch size ``q * n``) to keep the guarantee exact.
"""
from __future__ import annotations

import math

import torch

from atoll import rng
from atoll.codecs import bits as B
from atoll.codecs import flat
from atoll.codecs.base import Codec
from atoll.wireformat import CODE, DTYPES

COUNT_KEY = "__count__"  # optional scalar entry of the encoded tree: this client's N_k
SEED_KEY = "__dither_seed__"  # optional int64 scalar entry: the dither seed (else from the key)


def levels(delta: float, Z: int, clip: float, count: float) -> tuple[int, int]:  # noqa: N803
    """``(K, bits)``: integers lie in ``[-K, K]``, sent with ``bits`` bits each."""
    b = clip * count / delta + Z / 2  # B / D_k
    k = max(1, math.ceil(b - 1e-9))
    return k, (2 * k).bit_length()


def dithered_quantize(delta: float, Z: int, clip: float, norm: str = "linf",  # noqa: N803
                      count: float = 1.0, dimension: int | None = None,
                      sample_rate: float = 1.0, integers: bool = False) -> Codec:
    """The DP intrinsic quantizer codec (see the module docstring). Unbiased, not linear
    (packed bytes do not add up); use ``aggregate_integers`` for the secure-sum path.

    ``integers=True``: ``decode`` returns the integers ``m`` themselves (as floats of the leaf
    dtype, exact) instead of ``m * D_k - v``: the server then aggregates integers and removes
    the dithers itself (the ``intrinsic`` privacy mode, ``algorithms.dp``, where the dither seed
    comes with the tree as ``SEED_KEY`` and reaches the server beside the payload)."""
    if not (delta > 0 and clip > 0 and count > 0 and int(Z) == Z and Z >= 0):
        raise ValueError(f"dithered_quantize: need delta, clip, count > 0 and integer Z >= 0; "
                         f"got delta={delta}, clip={clip}, count={count}, Z={Z}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"dithered_quantize: norm must be 'linf' or 'l2', got {norm!r}")

    def encode(tree, state, key):
        tree = dict(tree)
        n_k = float(tree.pop(COUNT_KEY, count))
        given = tree.pop(SEED_KEY, None)
        step = delta / n_k
        k, nbits = levels(delta, Z, clip, n_k)
        x = _clip(torch.cat([v.reshape(-1).to(torch.float64) for v in tree.values()]), clip, norm)
        noise = _uniform_sum(rng.fold(key, "noise"), x.numel(), int(Z)) * step
        seed = rng.fold(key, "dither") if given is None else int(given)
        v = _uniform_sum(seed, x.numel(), 1) * step
        m = torch.floor((x + noise + v) / step + 0.5).clamp(-k, k).to(torch.int64)
        payload = {"q": B.pack(m + k, nbits), "seed": torch.tensor([seed], dtype=torch.int64),
                   "count": torch.tensor([n_k], dtype=torch.float64)}
        for name, t in tree.items():
            payload[f"leaf/{name}"] = torch.tensor([CODE[t.dtype], *t.shape], dtype=torch.int64)
        return payload, state

    def decode(payload):
        n_k, m, seed, leaves = _read(payload, delta, Z, clip)
        if integers:
            return _unflatten(m.to(torch.float64), leaves)
        step = delta / n_k
        flat = m.to(torch.float64) * step - dither(seed, m.numel()) * step
        return _unflatten(flat, leaves)

    from atoll.privacy import events  # lazy: dp-accounting loads only when needed

    event = (None if dimension is None
             else events.intrinsic_quantization(Z + 1, delta, clip, dimension, sample_rate))
    return Codec(f"dithered_quantize({delta:g},{Z},{clip:g})", init=lambda tree: (), encode=encode,
                 decode=decode, linear=False, unbiased=True, event=event)


def aggregate_integers(payloads: list[dict], delta: float, Z: int, clip: float) -> dict:  # noqa: N803
    """Sample-weighted mean ``sum_k N_k g~_k / sum_k N_k`` from integers and dither seeds.

    ``sum_k N_k g~_k = delta * (sum_k m_k - sum_k u_k)``: the first sum is plain integer
    addition (what a secure aggregation of the ``m_k`` reveals), the second the server
    regenerates from the seeds. Equals the float aggregation of ``decode`` outputs.
    """
    total_m, total_u, total_n, leaves = None, None, 0.0, None
    for p in payloads:
        n_k, m, seed, leaves = _read(p, delta, Z, clip)
        u = dither(seed, m.numel())
        total_m = m if total_m is None else total_m + m  # int64, exact
        total_u = u if total_u is None else total_u + u
        total_n += n_k
    flat = delta * (total_m.to(torch.float64) - total_u) / total_n
    return _unflatten(flat, leaves)


def _read(payload, delta, Z, clip):  # noqa: N803
    """Validate a payload: ``(N_k, integers m (d,), dither seed, leaf specs)``."""
    try:
        n_k = float(payload["count"][0])
        seed = int(payload["seed"][0])
        q = payload["q"]
    except (KeyError, IndexError) as exc:
        raise ValueError(f"dithered_quantize payload is missing {exc}") from exc
    if not 0 < n_k < math.inf:
        raise ValueError(f"dithered_quantize payload: count must be finite and > 0, got {n_k}")
    leaves = _leaves(payload)
    k, nbits = levels(delta, Z, clip, n_k)
    d = flat.check_limit(sum(math.prod(spec[1:]) for _, spec in leaves), "dithered_quantize")
    return n_k, B.unpack(q, nbits, d) - k, seed, leaves


def _leaves(payload) -> list:
    """The ``leaf/NAME`` records ``[dtype code, *shape]``, validated before they size anything."""
    out = []
    for name, t in payload.items():
        if not name.startswith("leaf/"):
            continue
        if t.dtype != torch.int64 or t.dim() != 1 or not 1 <= t.numel() <= 33:
            raise ValueError(f"dithered_quantize payload: record {name!r} must be 1 to 33 int64 values")
        code, *shape = t.tolist()
        if not 0 <= code < len(DTYPES) or any(s < 0 for s in shape):
            raise ValueError(f"dithered_quantize payload: record {name!r} has dtype code {code}, "
                             f"shape {shape}")
        out.append((name[5:], [code, *shape]))
    return out


def _unflatten(flat: torch.Tensor, leaves) -> dict:
    out, i = {}, 0
    for name, (code, *shape) in leaves:
        n = math.prod(shape)
        out[name] = flat[i:i + n].reshape(shape).to(DTYPES[code])
        i += n
    return out


def _clip(x: torch.Tensor, clip: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return x.clamp(-clip, clip)
    return x * torch.clamp(clip / torch.clamp(x.norm(), min=1e-300), max=1.0)


def dither(seed: int, d: int) -> torch.Tensor:
    """The dither ``u = v / D_k`` (``Uniform[-1/2, 1/2)``, length ``d``) that ``seed`` makes."""
    return _uniform_sum(seed, d, 1)


def _uniform_sum(key: int, d: int, count: int) -> torch.Tensor:
    """Sum of ``count`` independent ``Uniform[-1/2, 1/2)`` vectors of length ``d`` (float64)."""
    g = rng.generator(key)
    out = torch.zeros(d, dtype=torch.float64)
    for _ in range(count):
        out = out + (torch.rand(d, generator=g, dtype=torch.float64) - 0.5)
    return out
