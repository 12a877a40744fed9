"""The group operations of ECDH-PSI (``atoll.vertical.psi``): items hashed to X25519
u-coordinates under a session key, blinded by a secret scalar, checked as they come from the
peer (canonical encodings, no low-order points, no duplicates), compared, shuffled by a secret
order, and mapped over chunks in worker processes.

Values are handled as rows of 32 bytes; duplicates and matches are found by sorting the first
8 bytes of each row as one uint64 and checking the full 32 bytes of the candidates, so the
answers are exact whatever the values (rows that share 8 bytes take a slower exact path)."""
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


def fresh(n: int) -> bytes:
    """``n`` secret bytes from the OS (``secrets``): every scalar, nonce and secret order.
    Nothing in atoll replaces it; only bench/psi_replay.py does, in the process of the party it
    times, to make that party's messages reproducible (no option or config reaches it)."""
    return secrets.token_bytes(n)


def hash_to_group(items: list[bytes], session: bytes) -> bytes:
    """BLAKE2b keyed by the session id, top bit cleared: one u-coordinate (32 bytes) per item."""
    h = b"".join(hashlib.blake2b(x, digest_size=POINT, key=session, person=b"atoll-psi-h2g").digest()
                 for x in items)
    a = np.frombuffer(h, np.uint8).reshape(-1, POINT).copy()
    a[:, -1] &= 0x7F
    return a.tobytes()


def exponentiate(scalar: bytes, data: bytes, start: int = 0, what: str = "a value") -> bytes:
    """X25519(scalar, u) for each 32-byte u of ``data``; a low-order u is a ``PsiError``."""
    exchange, pub = X25519PrivateKey.from_private_bytes(scalar).exchange, X25519PublicKey.from_public_bytes
    try:
        return b"".join([exchange(pub(data[i:i + POINT])) for i in range(0, len(data), POINT)])
    except ValueError:
        for i in range(0, len(data), POINT):
            try:
                exchange(pub(data[i:i + POINT]))
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


def _rows(data: bytes) -> np.ndarray:
    """32-byte values as rows of four uint64 (a view, no copy)."""
    return np.frombuffer(data, np.uint64).reshape(-1, POINT // 8)


def first_duplicate(data: bytes) -> int | None:
    """The index of a value that occurs twice in ``data`` (32-byte values), or None: the later
    occurrence, of the duplicate that comes first in an exact sort of the candidates."""
    v = _rows(data)
    order = np.argsort(v[:, 0], kind="stable")
    tied = np.flatnonzero(v[order[1:], 0] == v[order[:-1], 0])
    if not tied.size:
        return None
    cand = np.unique(np.concatenate([order[tied], order[tied + 1]]))  # rows sharing 8 bytes
    sub = v[cand]
    o = np.lexsort(sub.T[::-1])
    same = np.flatnonzero((sub[o[1:]] == sub[o[:-1]]).all(1))
    return int(cand[o[same[0] + 1]]) if same.size else None


def member(data: bytes, ref: bytes) -> np.ndarray:
    """For each 32-byte value of ``data``, whether it occurs in ``ref`` (values without duplicates).
    Both sides are sorted by their first 8 bytes so that the search and the gathers run in order."""
    v, r = _rows(data), _rows(ref)
    if not len(v) or not len(r):
        return np.zeros(len(v), bool)
    rs = r[np.argsort(r[:, 0])]
    if (rs[1:, 0] == rs[:-1, 0]).any():  # two reference values share 8 bytes: exact and slower
        return np.isin(np.frombuffer(data, f"S{POINT}"), np.frombuffer(ref, f"S{POINT}"))
    order = np.argsort(v[:, 0])
    vs = v[order]
    pos = np.minimum(np.searchsorted(rs[:, 0], vs[:, 0]), len(rs) - 1)
    hit = np.empty(len(v), bool)
    hit[order] = (rs[pos] == vs).all(1)
    return hit


def secret_permutation(n: int) -> np.ndarray:
    """A uniformly random permutation from OS entropy (the peer cannot predict it)."""
    keys = np.frombuffer(fresh(8 * n), np.uint64)
    return np.argsort(keys, kind="stable")


class _Engine:
    """Maps the crypto over chunks, in this process or in ``workers`` spawned processes (started
    at once, so that they boot while the party reads its ids and says hello)."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            for _ in range(workers):
                self.pool.submit(int)

    def map(self, fn, tasks):
        return self.pool.map(fn, tasks) if self.pool else map(fn, tasks)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)
