"""The group operations of ECDH-PSI (``atoll.vertical.psi``): items hashed to X25519
u-coordinates under a session key, blinded by a secret scalar, checked as they come from the
peer (canonical encodings, no low-order points, no duplicates), shuffled by a secret order, and
mapped over chunks in worker processes."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import secrets
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

POINT = 32  # bytes per group element


class PsiError(ValueError):
    """The protocol stopped; the message says what was wrong and who got it wrong."""

    def __init__(self, message: str, from_peer: bool = False):
        super().__init__(message)
        self.from_peer = from_peer


def encode(item) -> bytes:
    """The bytes an item is hashed from: bytes as they are, str as UTF-8, int as its decimal."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
        return str(int(item)).encode()
    raise TypeError(f"PSI items are str, bytes or int, got {type(item).__name__}")


def hash_to_group(items: list[bytes], session: bytes) -> bytes:
    """BLAKE2b keyed by the session id, top bit cleared: one u-coordinate (32 bytes) per item."""
    h = b"".join(hashlib.blake2b(x, digest_size=POINT, key=session, person=b"atoll-psi-h2g").digest()
                 for x in items)
    a = np.frombuffer(h, np.uint8).reshape(-1, POINT).copy()
    a[:, -1] &= 0x7F
    return a.tobytes()


def exponentiate(scalar: bytes, data: bytes, start: int = 0, what: str = "a value") -> bytes:
    """X25519(scalar, u) for each 32-byte u of ``data``; a low-order u is a ``PsiError``."""
    key, pub = X25519PrivateKey.from_private_bytes(scalar), X25519PublicKey.from_public_bytes
    try:
        return b"".join([key.exchange(pub(data[i:i + POINT])) for i in range(0, len(data), POINT)])
    except ValueError:
        for i in range(0, len(data), POINT):
            try:
                key.exchange(pub(data[i:i + POINT]))
            except ValueError:
                raise PsiError(f"{what} {start + i // POINT} is a low-order point (blinding it "
                               "gives the identity)") from None
        raise


def _blind_task(task) -> bytes:
    scalar, session, items, start = task
    return exponentiate(scalar, hash_to_group(items, session), start, "this party's item")


def _reblind_task(task) -> bytes:
    scalar, data, start = task
    return exponentiate(scalar, data, start, "the peer's value")


def check_points(data: bytes, where: str) -> None:
    """Refuse a non-canonical encoding (top bit set, or u >= 2^255 - 19)."""
    a = np.frombuffer(data, np.uint8).reshape(-1, POINT)
    big = (a[:, 31] == 0x7F) & (a[:, 1:31] == 0xFF).all(1) & (a[:, 0] >= 0xED)
    bad = np.flatnonzero((a[:, 31] >= 0x80) | big)
    if bad.size:
        raise PsiError(f"{where}: value {bad[0]} is not a canonical X25519 u-coordinate "
                       "(top bit set or not below 2^255 - 19)")


def first_duplicate(data: bytes) -> int | None:
    """The index of a value that occurs twice in ``data`` (32-byte values), or None."""
    v = np.frombuffer(data, f"S{POINT}")
    order = np.argsort(v, kind="stable")
    same = np.flatnonzero(v[order][1:] == v[order][:-1])
    return int(order[same[0] + 1]) if same.size else None


def secret_permutation(n: int) -> np.ndarray:
    """A uniformly random permutation from OS entropy (the peer cannot predict it)."""
    keys = np.frombuffer(secrets.token_bytes(8 * n), np.uint64)
    return np.argsort(keys, kind="stable")


class _Engine:
    """Maps the crypto over chunks, in this process or in ``workers`` spawned processes."""

    def __init__(self, workers: int):
        self.pool = (ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
                     if workers > 1 else None)

    def map(self, fn, tasks):
        return self.pool.map(fn, tasks) if self.pool else map(fn, tasks)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)
