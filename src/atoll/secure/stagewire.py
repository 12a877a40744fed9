"""The messages of the four SecAgg stages as bytes, for a transport (``atoll.deploy``).

Every message is fixed-width records, so its exact size follows from the setup before any of it
is read: a reader checks the length first (``ValueError`` naming what is wrong), then the ids
(in the set the reader expects, each once), then the contents. Nothing is allocated from a
length the sender claims.

=========  ===============================================  ==================================
stage      server -> client (request)                       client -> server (answer)
=========  ===============================================  ==================================
1 keys     the setup (``setup_bytes``)                      ``c_pk || s_pk`` (64 bytes)
2 shares   neighbours' keys: records ``id u32, 64 bytes``   sealed shares: ``id u32, CT bytes``
3 masked   my inbox: records ``id u32, CT bytes``           the packed masked vector
4 unmask   wanted shares: records ``id u32, kind b|s``      shares: ``id u32, kind, SHARE bytes``
=========  ===============================================  ==================================

Against a malicious server (``[secure] malicious``, ``atoll.secure.active``) a key advertisement
is ``ADVERT`` bytes: the two keys, the 64-byte signature, the credential's length (u16) and the
credential zero-padded to ``CRED`` bytes; stage 4 is the consistency check (request: U3 as
records of ids alone; answer: a 64-byte signature) and stage 5 the unmasking, whose request is
``u32 length || the request above || signatures: records id u32, 64 bytes``.
"""
from __future__ import annotations

import math
import struct

from atoll.secure import active as A
from atoll.secure import primitives as pr
from atoll.secure import shamir
from atoll.secure.secagg import SEED, Setup

KEYS = 64                                  # two raw X25519 public keys
SHARE = 4 * shamir.chunks_for(SEED)        # one Shamir share of a 32-byte secret
CT = 12 + 16 + 2 * SHARE                   # nonce, GCM tag, the two shares sealed together
_HEAD = struct.Struct("<16sqIIIII")        # session, round, n, neighbours, threshold, bits, d
_ID = struct.Struct("<I")
ADVERT = KEYS + A.SIG + 2 + A.CRED         # signed keys and the signer's credential, padded
KINDS = (b"b", b"s")


def setup_bytes(st: Setup) -> bytes:
    head = _HEAD.pack(st.session, st.round, len(st.clients), st.neighbours, st.threshold, st.bits, st.d)
    return head + b"".join(_ID.pack(u) for u in st.clients)


def read_setup(raw: bytes, max_clients: int) -> Setup:
    if len(raw) < _HEAD.size:
        raise ValueError(f"setup: {len(raw)} bytes, shorter than its {_HEAD.size}-byte header")
    session, r, n, k, t, bits, d = _HEAD.unpack_from(raw)
    if not 2 <= n <= max_clients:
        raise ValueError(f"setup: {n} clients, not in [2, {max_clients}]")
    if len(raw) != _HEAD.size + 4 * n:
        raise ValueError(f"setup: {len(raw)} bytes, {_HEAD.size + 4 * n} expected for {n} clients")
    clients = tuple(_ID.unpack_from(raw, _HEAD.size + 4 * i)[0] for i in range(n))
    return Setup(session, r, clients, k, t, bits, d)


def records(items: dict[int, bytes]) -> bytes:
    """``{id: value}`` (values of one width) as records sorted by id."""
    return b"".join(_ID.pack(v) + items[v] for v in sorted(items))


def read_records(raw: bytes, width: int, allowed, what: str) -> dict[int, bytes]:
    """Records of ``width`` bytes after their id, ids in ``allowed``, each once."""
    size = _ID.size + width
    if len(raw) > size * len(allowed) or len(raw) % size:
        raise ValueError(f"{what}: {len(raw)} bytes is not a whole number of {size}-byte records, "
                         f"at most {len(allowed)}")
    out: dict[int, bytes] = {}
    for i in range(0, len(raw), size):
        v = _ID.unpack_from(raw, i)[0]
        if v not in allowed:
            raise ValueError(f"{what}: id {v} is not one this message may name")
        if v in out:
            raise ValueError(f"{what}: id {v} appears twice")
        out[v] = raw[i + _ID.size:i + size]
    return out


def keys_bytes(keys: tuple[bytes, bytes]) -> bytes:
    c_pk, s_pk = keys
    if len(c_pk) != 32 or len(s_pk) != 32:
        raise ValueError("keys: two 32-byte public keys expected")
    return c_pk + s_pk


def read_keys(raw: bytes) -> tuple[bytes, bytes]:
    if len(raw) != KEYS:
        raise ValueError(f"keys: {len(raw)} bytes, {KEYS} expected")
    if not (pr.usable(raw[:32]) and pr.usable(raw[32:])):
        raise ValueError("keys: not a usable X25519 public key (a low-order point)")
    return raw[:32], raw[32:]


def read_key_map(raw: bytes, allowed) -> dict[int, tuple[bytes, bytes]]:
    return {v: read_keys(k) for v, k in read_records(raw, KEYS, allowed, "neighbour keys").items()}


def advert_bytes(adv: tuple) -> bytes:
    c_pk, s_pk, sig, credential = adv
    if len(sig) != A.SIG or not 0 < len(credential) <= A.CRED:
        raise ValueError(f"advertisement: a {A.SIG}-byte signature and a credential of 1..{A.CRED} bytes")
    padded = credential.ljust(A.CRED, b"\0")
    return keys_bytes((c_pk, s_pk)) + sig + struct.pack("<H", len(credential)) + padded


def read_advert(raw: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    if len(raw) != ADVERT:
        raise ValueError(f"advertisement: {len(raw)} bytes, {ADVERT} expected")
    n = struct.unpack_from("<H", raw, KEYS + A.SIG)[0]
    start = KEYS + A.SIG + 2
    if not 0 < n <= A.CRED or raw[start + n:].strip(b"\0"):
        raise ValueError(f"advertisement: a credential of {n} bytes (1..{A.CRED}, zero-padded)")
    return (*read_keys(raw[:KEYS]), raw[KEYS:KEYS + A.SIG], raw[start:start + n])


def read_advert_map(raw: bytes, allowed) -> dict[int, tuple]:
    return {v: read_advert(a) for v, a in read_records(raw, ADVERT, allowed, "neighbour keys").items()}


def read_signature(raw: bytes) -> bytes:
    if len(raw) != A.SIG:
        raise ValueError(f"signature: {len(raw)} bytes, {A.SIG} expected")
    return raw


def unmask_bytes(survivors, dropped, signatures: dict[int, bytes]) -> bytes:
    req = request_bytes(survivors, dropped)
    return _ID.pack(len(req)) + req + records(signatures)


def read_unmask(raw: bytes, allowed, signers) -> tuple[set, set, dict[int, bytes]]:
    """Stage 5's request against a malicious server: the unmask request and the signatures."""
    n = _ID.unpack_from(raw)[0] if len(raw) >= _ID.size else -1
    if not 0 <= n <= len(raw) - _ID.size:
        raise ValueError(f"unmask request: a length {n} outside the {len(raw)}-byte message")
    survivors, dropped = read_request(raw[_ID.size:_ID.size + n], allowed)
    return survivors, dropped, read_records(raw[_ID.size + n:], A.SIG, signers, "signatures")


def request_bytes(survivors, dropped) -> bytes:
    """Stage 4's request; ids named in both sets are written twice (what a reader refuses)."""
    rec = [(v, b"b") for v in sorted(survivors)] + [(v, b"s") for v in sorted(dropped)]
    return b"".join(_ID.pack(v) + k for v, k in rec)


def read_request(raw: bytes, allowed) -> tuple[set, set]:
    want = read_records(raw, 1, allowed, "unmask request")
    if any(k not in KINDS for k in want.values()):
        raise ValueError("unmask request: a share kind is neither 'b' nor 's'")
    return {v for v, k in want.items() if k == b"b"}, {v for v, k in want.items() if k == b"s"}


def shares_bytes(out: dict[int, tuple[str, bytes]]) -> bytes:
    return records({v: kind.encode() + raw for v, (kind, raw) in out.items()})


def read_shares(raw: bytes, wanted: dict[int, str]) -> dict[int, tuple[str, bytes]]:
    """Stage 4's answer, each share of the kind that was asked for ``wanted`` ``{id: kind}``."""
    got = read_records(raw, 1 + SHARE, wanted, "unmask answer")
    bad = [v for v, rec in got.items() if rec[:1].decode("latin-1") != wanted[v]]
    if bad:
        raise ValueError(f"unmask answer: shares of {bad} are not of the kind asked for")
    for rec in got.values():  # every value in the field (ValueError naming it otherwise)
        shamir.from_bytes(rec[1:], shamir.chunks_for(SEED))
    return {v: (wanted[v], rec[1:]) for v, rec in got.items()}


def masked_size(st: Setup) -> int:
    return math.ceil(st.d * st.bits / 8)


def answer_limit(stage: int, st: Setup, fan: int, malicious: bool = False) -> int:
    """The largest answer a client with ``fan`` neighbours may send at ``stage``."""
    if malicious:
        return {1: ADVERT, 2: fan * (_ID.size + CT), 3: masked_size(st), 4: A.SIG,
                5: fan * (_ID.size + 1 + SHARE)}[stage]
    return {1: KEYS, 2: fan * (_ID.size + CT), 3: masked_size(st),
            4: fan * (_ID.size + 1 + SHARE)}[stage]
