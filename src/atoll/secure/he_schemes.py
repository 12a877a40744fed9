"""The two homomorphic schemes behind ``atoll.secure.he.HomomorphicSum``, each split into what a
client and the aggregating server may hold (``public``) and what only the key holder holds.

``Ckks`` (TenSEAL): approximate arithmetic on 4096-slot vectors (ring degree 8192, one 60-bit
data prime, scale 2^45); one ciphertext per 4096 coordinates. ``Paillier`` (``phe`` key
generation, the arithmetic here): 31 fixed-point coordinates (64-bit slots, 36 fraction bits)
packed into one plaintext of a 2048-bit key; the secret exponent is split additively between
``decryptors`` parties when there are two or more (threshold decryption, all must cooperate).

Both libraries are imported lazily (the optional extra ``atoll[he]``). Nothing from the wire is
parsed before its length is checked against what the scheme expects for ``d`` coordinates.
"""
from __future__ import annotations

import math
import secrets
import struct

import numpy as np

EXTRA = "homomorphic encryption needs the optional extra: pip install 'atoll[he]' (tenseal, phe)"


def _need(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{EXTRA}; {module!r} is missing") from None


class Ckks:
    """CKKS: ``encrypt`` by anyone with the public context, ``add`` by the server, ``decrypt``
    only by the holder of ``secret``. ``max_abs``: the client's bound on ``|w x|`` (the sum of
    up to 1024 such stays below 2^14, the data prime's room above the scale)."""

    DEGREE, SCALE_BITS, SLOTS, max_abs = 8192, 45, 4096, 16.0

    def __init__(self, public: bytes | None = None, secret: bytes | None = None):
        """New keys, or loaded ones (``atoll.secure.he_keys``): ``public`` alone (a client, the
        server) or ``secret`` (a key holder; its public half is derived)."""
        ts = _need("tenseal")
        self.secret = None if secret is None else _context(ts, secret, private=True)
        if public is None and secret is None:
            self.secret = ts.context(ts.SCHEME_TYPE.CKKS, self.DEGREE, coeff_mod_bit_sizes=[60, 60])
            self.secret.global_scale = 2.0 ** self.SCALE_BITS
        if public is not None:
            self.public = _context(ts, public, private=False)
        else:
            self.public = self.secret.copy()
            self.public.make_context_public()  # what clients and the server get: no secret key
        self.max_blob = len(ts.ckks_vector(self.public, [0.0] * self.SLOTS).serialize()) * 11 // 10 + 4096

    def chunks(self, d: int) -> int:
        return -(-d // self.SLOTS)

    def encrypt(self, x: np.ndarray) -> bytes:
        ts = _need("tenseal")
        if np.abs(x).max(initial=0.0) > self.max_abs:
            raise ValueError(f"he: |coordinate| > {self.max_abs} is outside the CKKS range")
        return self.dump([ts.ckks_vector(self.public, x[i:i + self.SLOTS].tolist())
                          for i in range(0, len(x), self.SLOTS)])

    @staticmethod
    def dump(cts: list) -> bytes:
        """Ciphertexts as bytes ``parse`` reads (a client's, or the server's sum)."""
        blobs = [c.serialize() for c in cts]
        return struct.pack(f"<{len(blobs) + 1}I", len(blobs), *map(len, blobs)) + b"".join(blobs)

    def parse(self, data: bytes, d: int) -> list:
        """A client's ciphertexts for ``d`` coordinates; ValueError naming what is wrong."""
        ts = _need("tenseal")
        k = self.chunks(d)
        if not isinstance(data, bytes) or len(data) < 4 * (k + 1):
            raise ValueError(f"he: {len(data) if isinstance(data, bytes) else type(data).__name__} "
                             f"bytes cannot hold {k} ciphertexts")
        head = struct.unpack_from(f"<{k + 1}I", data)
        if head[0] != k or max(head[1:]) > self.max_blob or 4 * (k + 1) + sum(head[1:]) != len(data):
            raise ValueError(f"he: the header does not describe {k} ciphertexts of at most "
                             f"{self.max_blob} bytes filling {len(data)} bytes")
        out, at = [], 4 * (k + 1)
        for i, size in enumerate(head[1:]):
            try:
                v = ts.ckks_vector_from(self.public, data[at:at + size])
            except Exception as exc:  # noqa: BLE001 -- SEAL/protobuf refuse in many ways
                raise ValueError(f"he: ciphertext {i} does not load: {str(exc)[:80]}") from None
            want = min(self.SLOTS, d - i * self.SLOTS)
            if v.size() != want:
                raise ValueError(f"he: ciphertext {i} holds {v.size()} values, expected {want}")
            out.append(v)
            at += size
        return out

    @staticmethod
    def add(a: list, b: list) -> list:
        return [x + y for x, y in zip(a, b)]

    def decrypt(self, cts: list) -> np.ndarray:
        ts = _need("tenseal")
        return np.concatenate([np.asarray(ts.ckks_vector_from(self.secret, c.serialize()).decrypt())
                               for c in cts])


def _context(ts, data: bytes, private: bool):
    """A TenSEAL context from a key file's bytes: CKKS at this module's scale, with (``private``)
    or without the secret key; ValueError otherwise."""
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # noqa: BLE001 -- SEAL refuses in many ways
        raise ValueError(f"he: not a TenSEAL context: {str(exc)[:80]}") from None
    if ctx.is_private() != private or ctx.global_scale != 2.0 ** Ckks.SCALE_BITS:
        raise ValueError(f"he: expected a CKKS context {'with' if private else 'without'} the "
                         f"secret key at scale 2^{Ckks.SCALE_BITS}")
    return ctx


class Paillier:
    """Packed Paillier with fixed point: ``encrypt`` with the public ``n``, ``add`` by the server
    (ciphertext product mod n^2), ``decrypt(sum, count)`` by the key holder or, with
    ``decryptors >= 2``, by the product of every decryptor's ``partial``."""

    SLOT, FRAC, FIELD, MAX_CLIENTS = 64, 36, 54, 1024  # a client's value fills FIELD bits of a slot

    def __init__(self, key_bits: int = 2048, decryptors: int = 2, n: int | None = None):
        """New keys, or the public key ``n`` alone (loaded by ``atoll.secure.he_keys``)."""
        phe = _need("phe")
        if n is None:
            pub, priv = phe.generate_paillier_keypair(n_length=key_bits)
        else:
            pub, priv = phe.PaillierPublicKey(n), None
        self.n, self.pub = pub.n, pub
        self.n2, self.width = pub.n * pub.n, 2 * key_bits // 8
        self.slots = (key_bits - 1) // self.SLOT
        self.max_abs = 2.0 ** (self.FIELD - 1 - self.FRAC)
        self._priv = priv if decryptors == 1 else None
        self.shares = [] if decryptors == 1 or priv is None else self.deal(priv.p, priv.q, decryptors)

    def deal(self, p: int, q: int, t: int) -> list[int]:
        """Additive shares, mod ``n lambda``, of ``d = lambda (lambda^-1 mod n)``: ``c^d = 1 + m n``
        (mod n^2). The dealer (key generation) forgets ``p, q``; each share alone is uniform."""
        lam = math.lcm(p - 1, q - 1)
        order, d = self.n * lam, lam * pow(lam, -1, self.n)
        shares = [secrets.randbelow(order) for _ in range(t - 1)]
        return shares + [(d - sum(shares)) % order]

    def chunks(self, d: int) -> int:
        return -(-d // self.slots)

    def encode(self, x: np.ndarray) -> list[int]:
        if np.abs(x).max(initial=0.0) >= self.max_abs:
            raise ValueError(f"he: |coordinate| >= {self.max_abs} is outside the fixed-point range")
        u = (np.rint(x * 2.0 ** self.FRAC).astype(np.int64) + (1 << (self.FIELD - 1))).astype("<u8")
        u = np.concatenate([u, np.zeros(-len(u) % self.slots, "<u8")])
        return [int.from_bytes(u[i:i + self.slots].tobytes(), "little") for i in range(0, len(u), self.slots)]

    def encrypt(self, x: np.ndarray) -> bytes:
        return self.dump([self.pub.raw_encrypt(m) for m in self.encode(x)])

    def dump(self, cts: list[int]) -> bytes:
        """Ciphertexts (or partial decryptions: units mod n^2 too) as bytes ``parse`` reads."""
        return b"".join(c.to_bytes(self.width, "big") for c in cts)

    def parse(self, data: bytes, d: int) -> list[int]:
        k = self.chunks(d)
        if not isinstance(data, bytes) or len(data) != k * self.width:
            raise ValueError(f"he: expected {k} ciphertexts of {self.width} bytes, got "
                             f"{len(data) if isinstance(data, bytes) else type(data).__name__}")
        cts = [int.from_bytes(data[i:i + self.width], "big") for i in range(0, len(data), self.width)]
        if any(not 0 < c < self.n2 or math.gcd(c, self.n) != 1 for c in cts):
            raise ValueError("he: a ciphertext is not a unit mod n^2")
        return cts

    def add(self, a: list[int], b: list[int]) -> list[int]:
        return [x * y % self.n2 for x, y in zip(a, b)]

    def partial(self, share: int, cts: list[int]) -> list[int]:
        """One decryptor's step: ``c^share mod n^2``, alone indistinguishable from noise."""
        return [pow(c, share, self.n2) for c in cts]

    def combine(self, partials: list[list[int]]) -> list[int]:
        """The plaintexts from every decryptor's ``partial``; ValueError where their product is
        not ``1 + m n`` (a decryptor returned garbage, or a share is missing)."""
        out = []
        for parts in zip(*partials):
            x = math.prod(parts) % self.n2
            if x % self.n != 1:
                raise ValueError("he: the partial decryptions do not combine (a decryptor returned "
                                 "garbage or a share is missing)")
            out.append((x - 1) // self.n)
        return out

    def decode(self, ms: list[int], count: int, d: int) -> np.ndarray:
        raw = b"".join(m.to_bytes(self.slots * self.SLOT // 8, "little") for m in ms)
        sums = [int(v) for v in np.frombuffer(raw, "<u8")[:d]]
        off = count << (self.FIELD - 1)
        return np.array([(s - off) / 2.0 ** self.FRAC for s in sums])

    def decrypt(self, cts: list[int], count: int, d: int) -> np.ndarray:
        if self._priv is not None:
            ms = [self._priv.raw_decrypt(c) for c in cts]
        else:
            ms = self.combine([self.partial(s, cts) for s in self.shares])
        return self.decode(ms, count, d)
