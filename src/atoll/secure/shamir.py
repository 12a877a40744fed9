"""Shamir t-of-n secret sharing of byte strings over GF(p), p = 2^31 - 1, vectorised.

A secret of ``L`` bytes is cut into 3-byte chunks (each < 2^24 < p); every chunk is the constant
term of its own random polynomial of degree ``t - 1``; the share of party ``x`` (x = 1..255) is
every polynomial evaluated at ``x``. Any ``t`` shares give the secret back (Lagrange at 0); fewer
give nothing about it (Shamir 1979). Arithmetic stays in int64: operands are < 2^31, so a
product is < 2^62. Coefficients come from the OS CSPRNG (``secrets``).
"""
from __future__ import annotations

import secrets

import numpy as np

P = 2**31 - 1
CHUNK = 3


def _chunks(secret: bytes) -> np.ndarray:
    pad = secret + b"\0" * (-len(secret) % CHUNK)
    raw = np.frombuffer(pad, dtype=np.uint8).reshape(-1, CHUNK).astype(np.int64)
    return raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)  # (m,)


def _unchunks(values: np.ndarray, length: int) -> bytes:
    v = values.astype(np.int64)
    if (v < 0).any() or (v >= 1 << 24).any():
        raise ValueError("shamir: the shares do not reconstruct a valid secret (inconsistent shares)")
    raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8)
    return raw.tobytes()[:length]


def _random_field(shape) -> np.ndarray:
    # uniform in [0, P): rejection on 31-bit draws (P = 2^31 - 1 rejects one value in 2^31)
    out = np.frombuffer(secrets.token_bytes(4 * int(np.prod(shape))), dtype=np.uint32) & 0x7FFFFFFF
    out = out.astype(np.int64).reshape(shape)
    while (bad := out == P).any():
        out[bad] = np.frombuffer(secrets.token_bytes(4 * int(bad.sum())), dtype=np.uint32) & 0x7FFFFFFF
    return out


def split(secret: bytes, xs: list[int], t: int) -> dict[int, np.ndarray]:
    """Shares of ``secret`` for parties ``xs`` (distinct, 1..P-1), any ``t`` of which rebuild it."""
    if not 1 <= t <= len(xs):
        raise ValueError(f"shamir: threshold t={t} must be in [1, {len(xs)}] (the number of parties)")
    if len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs):
        raise ValueError("shamir: share points must be distinct and in [1, p)")
    coeffs = np.concatenate([_chunks(secret)[None], _random_field((t - 1, len(_chunks(secret))))])  # (t, m)
    shares = {}
    for x in xs:
        acc = np.zeros(coeffs.shape[1], dtype=np.int64)
        for c in coeffs[::-1]:  # Horner
            acc = (acc * x + c) % P
        shares[x] = acc
    return shares


def combine(shares: dict[int, np.ndarray], length: int, t: int) -> bytes:
    """The secret of ``length`` bytes from at least ``t`` shares ``{x: values}``."""
    if len(shares) < t:
        raise ValueError(f"shamir: {len(shares)} shares cannot rebuild a secret shared {t}-of-n")
    xs = sorted(shares)[:t]
    acc = np.zeros_like(shares[xs[0]])
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num, den = num * (-j) % P, den * (i - j) % P
        lam = num * pow(den, P - 2, P) % P
        acc = (acc + shares[i] * lam) % P
    return _unchunks(acc, length)


def to_bytes(share: np.ndarray) -> bytes:
    return share.astype("<u4").tobytes()


def from_bytes(raw: bytes, chunks: int) -> np.ndarray:
    if len(raw) != 4 * chunks:
        raise ValueError(f"shamir: a share must be {4 * chunks} bytes, got {len(raw)}")
    v = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    if (v >= P).any():
        raise ValueError("shamir: a share value is outside the field")
    return v


def chunks_for(length: int) -> int:
    return -(-length // CHUNK)
