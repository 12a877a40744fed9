"""Signed inputs of homomorphic encryption against a malicious server (``[secure] malicious``).

Without them a decryptor opens the one ciphertext the server calls a sum, and a server that sends
one client's ciphertext reads that client's update. With them each client signs its ciphertext
with its enrolment key (``atoll.secure.active``: the certificate names the client's id, the
deployment's CA signed it), and the server forwards every input with its certificate and
signature instead of the sum; the decryptor checks them all, sums homomorphically itself and
opens one sum per round of at least ``min_clients`` distinct clients (``he_keys.Decryptor``).

A client signs ``input_message``: a domain tag, the run id, the round, its id and the SHA-256 of
its ciphertext bytes. A signed answer (client -> server) is ``<II`` (ciphertext bytes,
certificate bytes), the ciphertext, the 64-byte signature, the certificate (DER). A bundle (server
-> decryptor) is ``<I`` count, then per input ``<qII`` (client id, ciphertext bytes, certificate
bytes) and the same three fields. Every length is checked against its bound before a byte is
sliced, and nothing is parsed before the whole framing checks.
"""
from __future__ import annotations

import hashlib
import struct

from atoll.secure import active as A
from atoll.secure.he import HEError

MAX_INPUTS = 1024  # the most inputs in one sum (the schemes' room: he_schemes MAX_CLIENTS)
OVERHEAD = 8 + A.SIG + A.CRED  # a signed answer beyond its ciphertext, at most
_RUN = 64  # bytes of a run id at most


class SignedInputError(HEError):
    """A signed input (or a bundle of them) that is malformed, forged, repeated or too few."""


def input_message(run: bytes, round_: int, cid: int, ct: bytes) -> bytes:
    if len(run) > _RUN:
        raise SignedInputError(f"he: a run id of {len(run)} bytes (at most {_RUN})")
    return (b"atoll-he/input" + struct.pack("<B", len(run)) + run + struct.pack("<qq", round_, cid)
            + hashlib.sha256(ct).digest())


def seal(identity: A.Identity, run: bytes, round_: int, cid: int, ct: bytes) -> bytes:
    """A client's answer: its ciphertext with its certificate and signature."""
    sig = A.sign(identity.key, input_message(run, round_, cid, ct))
    return struct.pack("<II", len(ct), len(identity.credential)) + ct + sig + identity.credential


def unseal(raw: bytes, max_ct: int) -> tuple[bytes, bytes, bytes]:
    """``(ciphertext, signature, certificate)`` of a signed answer; SignedInputError if its
    framing is wrong or a part is over its bound."""
    if len(raw) < 8:
        raise SignedInputError(f"he: a signed input of {len(raw)} bytes")
    n_ct, n_cred = struct.unpack_from("<II", raw)
    return _parts(raw, 8, n_ct, n_cred, max_ct, "a signed input")[:3]


def _parts(raw: bytes, at: int, n_ct: int, n_cred: int, max_ct: int, what: str):
    if not (0 < n_ct <= max_ct and 0 < n_cred <= A.CRED):
        raise SignedInputError(f"he: {what}: a ciphertext of {n_ct} bytes (at most {max_ct}) or "
                               f"a certificate of {n_cred} bytes (at most {A.CRED})")
    end = at + n_ct + A.SIG + n_cred
    if end > len(raw):
        raise SignedInputError(f"he: {what}: {len(raw) - at} bytes, its header announces {end - at}")
    ct, sig = raw[at:at + n_ct], raw[at + n_ct:at + n_ct + A.SIG]
    return ct, sig, raw[at + n_ct + A.SIG:end], end


def bundle(inputs: dict[int, tuple[bytes, bytes, bytes]]) -> bytes:
    """The server's request to a decryptor: ``{client: (ciphertext, signature, certificate)}``."""
    out = [struct.pack("<I", len(inputs))]
    for cid in sorted(inputs):
        ct, sig, cred = inputs[cid]
        out += [struct.pack("<qII", cid, len(ct), len(cred)), ct, sig, cred]
    return b"".join(out)


def max_bundle(count: int, max_ct: int) -> int:
    """The largest bundle of ``count`` inputs of at most ``max_ct`` ciphertext bytes."""
    return 4 + count * (16 + max_ct + A.SIG + A.CRED)


def unbundle(raw: bytes, count: int, max_ct: int) -> list[tuple[int, bytes, bytes, bytes]]:
    """``[(client, ciphertext, signature, certificate)]``: exactly ``count`` inputs filling
    ``raw``; SignedInputError naming what is wrong."""
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != count:
        raise SignedInputError(f"he: the bundle does not hold the {count} inputs announced")
    out, at = [], 4
    for i in range(count):
        if at + 16 > len(raw):
            raise SignedInputError(f"he: the bundle ends before input {i} of {count}")
        cid, n_ct, n_cred = struct.unpack_from("<qII", raw, at)
        ct, sig, cred, at = _parts(raw, at + 16, n_ct, n_cred, max_ct, f"input {i} (client {cid})")
        out.append((cid, ct, sig, cred))
    if at != len(raw):
        raise SignedInputError(f"he: {len(raw) - at} bytes after the bundle's {count} inputs")
    return out


def verify(pki, run: bytes, round_: int, inputs: list, min_clients: int) -> None:
    """Every input signed for ``(run, round_)`` by the enrolled client it names, each client
    once, at least ``min_clients`` of them; SignedInputError naming the first that is not."""
    ids = [cid for cid, *_ in inputs]
    if len(set(ids)) != len(ids):
        raise SignedInputError(f"he: client {max(ids, key=ids.count)} appears twice in the bundle")
    if len(ids) < min_clients:
        raise SignedInputError(f"he: {len(ids)} signed inputs, this decryptor opens sums of >= "
                               f"{min_clients} clients")
    for cid, ct, sig, cred in inputs:
        try:
            public = pki.public(cid, cred)
        except A.SignatureError as exc:
            raise SignedInputError(f"he: refused: {exc}") from None
        if not A.verifies(public, input_message(run, round_, cid, ct), sig):
            raise SignedInputError(f"he: refused: client {cid}'s input is not signed by client "
                                   f"{cid} for round {round_} of this run")
