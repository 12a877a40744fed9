"""Homomorphic encryption as the round's sum (``[secure] method = "ckks" | "paillier"``): the
server adds the clients' encrypted updates and never sees one in the clear.

Client half, ``HomomorphicSum.encode(delta, n, key)``: weigh the update by ``w = n / max_weight``
(``n``: its record count), append ``w`` itself as one more coordinate, encrypt under the key
holder's public key (``atoll.secure.he_schemes``) and send the bytes. Server half,
``aggregate(inputs, round, like)``: check every client's bytes against the length ``d`` coordinates
need (nothing is parsed before), drop what does not load (with the reason), multiply/add the
ciphertexts, and hand the one summed ciphertext to the ``KeyHolder``; the weighted mean is
``sum(w x) / sum(w)``.

Trust model: one key pair. Whoever holds the secret key can decrypt any single ciphertext, so the
secret is held by a key holder that is not the aggregating server (here: an object the server
reaches only through ``KeyHolder.decrypt_sum``, once per round, for a sum of at least
``min_clients`` updates). Unlike NVFlare's HE filters, the secret key is not given to every client
(any client could then decrypt any other's update if it saw it). A key holder colluding with the
server sees every update. A server that lies about what it sends for decryption (one client's
ciphertext, "a sum of 2") reads that client's update from a key holder that takes its word; with
``malicious = true`` the key holder opens only inputs each signed by a distinct enrolled client
and sums them itself (``atoll.secure.he_signed``, deployment). Paillier
with ``decryptors >= 2`` splits the secret exponent additively: every decryptor must apply its
share, and no single one (nor the server) can decrypt anything alone. CKKS has one key holder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from atoll import tree as T
from atoll.secure.secagg import SecAggError


class HEError(SecAggError):
    """The round cannot finish under encryption (the model stays unchanged)."""


class KeyHolder:
    """The secret half: creates the key pair, gives out only the public part, and decrypts only
    one sum per round of at least ``min_clients`` updates."""

    def __init__(self, scheme: str, key_bits: int, decryptors: int, min_clients: int):
        from atoll.secure import he_schemes as S

        self._scheme = S.Ckks() if scheme == "ckks" else S.Paillier(key_bits, decryptors)
        self.public = _Public(self._scheme)
        self.min_clients, self.rounds = min_clients, set()

    def decrypt_sum(self, round_: int, cts: list, count: int, d: int, kept=()) -> np.ndarray:
        if round_ in self.rounds:
            raise HEError(f"he: the key holder already decrypted round {round_}'s sum")
        if count < self.min_clients:
            raise HEError(f"he: the key holder decrypts sums of >= {self.min_clients} updates, got {count}")
        self.rounds.add(round_)
        s = self._scheme
        return s.decrypt(cts)[:d] if hasattr(s, "secret") else s.decrypt(cts, count, d)


class RemoteHolder:
    """Deployment's key holder as the server sees it: the ``scheme`` with the public key only
    (``atoll.secure.he_keys.load_public``) and ``decrypt(round, cts, count, d)``, the decryptors
    reached over the network (``atoll.deploy.he_rounds``); None on a client, which only encrypts."""

    def __init__(self, scheme, decrypt=None, min_clients: int = 2):
        self.public, self.call, self.min_clients = _Public(scheme), decrypt, min_clients

    def decrypt_sum(self, round_: int, cts: list, count: int, d: int, kept=()) -> np.ndarray:
        """``kept``: the clients in the sum (the signed inputs a malicious-mode decryptor sums)."""
        if self.call is None:
            raise HEError("he: this party holds the public key only")
        if count < self.min_clients:  # the decryptors refuse it too; not worth the round trip
            raise HEError(f"he: the key holder decrypts sums of >= {self.min_clients} updates, got {count}")
        return self.call(round_, cts, count, d, kept)


class _Public:
    """What clients and the server may use: encrypt, parse, add (no secret)."""

    def __init__(self, scheme):
        self.encrypt, self.parse, self.add, self.chunks = scheme.encrypt, scheme.parse, scheme.add, scheme.chunks
        self.dump, self.scheme = scheme.dump, scheme


@dataclass(frozen=True)
class HomomorphicSum:
    scheme: str = "ckks"           # "ckks" (TenSEAL) or "paillier" (phe)
    max_weight: float = 1.0        # public bound on a client's record count: w = n / max_weight <= 1
    key_bits: int = 2048           # Paillier modulus
    decryptors: int = 2            # Paillier: parties sharing the secret exponent (1: one key holder)
    min_clients: int = 2           # the key holder decrypts no sum of fewer updates
    malicious: bool = False        # deployment: signed inputs, summed by the decryptors (he_signed)
    _keys: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.scheme not in ("ckks", "paillier"):
            raise ValueError(f"he: scheme must be 'ckks' or 'paillier', got {self.scheme!r}")
        if not (self.max_weight > 0 and self.decryptors >= 1 and self.min_clients >= 1
                and self.key_bits >= 1024):
            raise ValueError("he: max_weight > 0, decryptors >= 1, min_clients >= 1, key_bits >= 1024")

    def __getstate__(self):  # keys stay in the process that made them
        return {k: v for k, v in self.__dict__.items() if k != "_keys"} | {"_keys": {}}

    def with_holder(self, holder: RemoteHolder) -> "HomomorphicSum":
        """This stage with deployment's keys: a client's pinned public key, or the server's
        public key and its remote decryptors (in place of a ``KeyHolder`` made here)."""
        return HomomorphicSum(self.scheme, self.max_weight, self.key_bits, self.decryptors,
                              holder.min_clients, self.malicious, {"holder": holder})

    @property
    def holder(self) -> KeyHolder:
        if "holder" not in self._keys:
            self._keys["holder"] = KeyHolder(self.scheme, self.key_bits, self.decryptors, self.min_clients)
        return self._keys["holder"]

    bucket = None  # one sum per round: the key holder decrypts no more
    noise = None   # no distributed DP noise under HE

    def buckets(self, clients: list[int], key: int) -> list[list[int]]:
        """The round's one group (``SecureSum.buckets`` without buckets)."""
        return [sorted(clients)]

    def encode(self, delta: dict, n: float, key: int) -> bytes:
        """The client half: ``(w x, w)`` encrypted under the public key (``key`` unused: the
        encryption's randomness is the client's own secret, from the OS)."""
        flat = torch.cat([v.reshape(-1).to(torch.float64) for v in delta.values()]).numpy()
        if not np.isfinite(flat).all():
            raise ValueError("he: the update is not finite")
        w = float(n) / self.max_weight
        if not 0 < w <= 1:
            raise ValueError(f"he: record count {n} is not in (0, max_weight = {self.max_weight}]")
        return self.holder.public.encrypt(np.append(flat * w, w))

    def aggregate(self, inputs: dict[int, bytes], round_: int, like: dict) -> tuple[dict, dict]:
        """The server half: ``(weighted mean like ``like``, stats)``; stats["secure_rejected"]
        lists ``(client, reason)`` for bytes that did not load. HEError: no decryptable sum."""
        pub, d = self.holder.public, sum(v.numel() for v in like.values()) + 1
        t0, total, kept, rejected = time.perf_counter(), None, [], []
        for cid in sorted(inputs):
            try:
                cts = pub.parse(inputs[cid], d)
                total = cts if total is None else pub.add(total, cts)
            except Exception as exc:  # noqa: BLE001 -- a hostile client must not stop the round
                rejected.append((cid, f"he: client {cid}'s ciphertext dropped: {str(exc)[:120]}"))
                continue
            kept.append(cid)
        t1 = time.perf_counter()
        if total is None:
            raise HEError("he: no client sent a ciphertext that loads")
        s = self.holder.decrypt_sum(round_, total, len(kept), d, kept)
        t2 = time.perf_counter()
        if not 0 < s[-1] <= len(kept) * (1 + 1e-6):  # each weight is in (0, 1]
            raise HEError(f"he: the decrypted summed weight {s[-1]:.6g} is outside (0, {len(kept)}] "
                          "(a decryptor returned garbage, or the sum is not of these clients)")
        if not np.isfinite(s).all():
            raise HEError("he: the decrypted sum is not finite")
        mean = torch.from_numpy(np.ascontiguousarray(s[:-1] / s[-1]))
        dtype = next(iter(like.values())).dtype
        stats = {"secure_survivors": len(kept), "secure_rejected": rejected,
                 "secure_bytes_up": max((len(inputs[c]) for c in kept), default=0),
                 "secure_server_s": round(t1 - t0, 4), "secure_decrypt_s": round(t2 - t1, 4)}
        return {k: v.to(dtype) for k, v in T.unflatten(mean, like).items()}, stats
