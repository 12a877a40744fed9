"""The cryptographic building blocks of secure aggregation, all from ``cryptography``.

- key agreement: X25519, the shared secret through HKDF-SHA256 with a purpose label, so the
  channel key and the mask seed of one pair of keys are independent;
- authenticated encryption of share messages: AES-256-GCM, a random 96-bit nonce, the
  associated data binding (session, round, sender, receiver), so a ciphertext replayed to another
  receiver, round or session fails to open;
- the mask PRG: AES-256-CTR keyed by a 256-bit seed over a zero counter block, its keystream read
  as little-endian uint32 words masked to the ring's bits (the ring is 2^bits, so this is uniform);
- bit-packing of ring elements at exactly ``bits`` bits each.
"""
from __future__ import annotations

import os
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = serialization.Encoding.Raw


def keypair() -> tuple[bytes, bytes]:
    """``(private, public)`` raw 32-byte X25519 keys from the OS CSPRNG."""
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            sk.public_key().public_bytes(RAW, serialization.PublicFormat.Raw))


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, label: bytes) -> bytes:
    """A 32-byte key both ends of a pair derive, distinct per ``label``."""
    if len(peer_public) != 32:
        raise ValueError(f"a public key must be 32 bytes, got {len(peer_public)}")
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"atoll-secagg/" + label).derive(shared)


_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(32)))


def usable(public: bytes) -> bool:
    """Whether a 32-byte X25519 public key gives a shared secret (not a low-order point, with
    which every exchange fails and an honest neighbour could not share with its owner)."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
        return True
    except ValueError:
        return False


def aad(session: bytes, round_: int, sender: int, receiver: int) -> bytes:
    return session + struct.pack("<qqq", round_, sender, receiver)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """Decrypt and authenticate; raises ``cryptography.exceptions.InvalidTag`` on any tampering."""
    if len(ciphertext) < 28:
        raise ValueError("ciphertext too short")
    return AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], associated)


def keystream(seed: bytes, d: int) -> np.ndarray:
    """The mask PRG's ``d`` raw little-endian uint32 words (AES-256-CTR under ``seed``)."""
    if len(seed) != 32:
        raise ValueError("prg: the seed must be 32 bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(bytes(4 * d)), dtype="<u4")


def prg(seed: bytes, d: int, bits: int) -> np.ndarray:
    """``d`` uniform elements of Z_{2^bits} (bits <= 32) as uint64, from a 256-bit seed."""
    if not 1 <= bits <= 32:
        raise ValueError(f"prg: bits must be in 1..32, got {bits}")
    return keystream(seed, d).astype(np.uint64) & np.uint64((1 << bits) - 1)


def add_prg(acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """``acc += sign * PRG(seed)`` in place, in uint32 (wrapping modulo 2^32, a multiple of
    every ring's 2^bits): reduced modulo 2^bits once at the end, it equals the sum of ``prg``'s
    elements, with one pass per mask instead of three (the deployed client's hot path)."""
    words = keystream(seed, len(acc))
    if sign > 0:
        acc += words
    else:
        acc -= words


def pack(values: np.ndarray, bits: int) -> bytes:
    """Ring elements (their low ``bits`` bits, ``bits <= 32``) as a little-endian bit string of
    ``bits`` bits each. Eight values fill ``bits`` bytes, so each group of eight is laid into
    ``ceil(bits / 8)`` 64-bit words, value ``k`` at bit ``k * bits``, and the first ``bits``
    bytes of the words are kept (3x faster than a bit matrix at d = 10^6; that reference is
    ``tests/secure/test_secagg.py``'s)."""
    v = np.asarray(values)
    d, groups, nw = len(v), -(-len(v) // 8), -(-bits // 8)
    vals = np.zeros(groups * 8, dtype=np.uint64)
    vals[:d] = v  # any integer dtype, wrapped as astype does
    vals &= np.uint64((1 << bits) - 1)
    vals = vals.reshape(groups, 8)
    words = np.zeros((groups, nw), dtype="<u8")
    for k in range(8):
        w, shift = divmod(k * bits, 64)
        words[:, w] |= vals[:, k] << np.uint64(shift)
        if shift + bits > 64:  # the value straddles two words
            words[:, w + 1] |= vals[:, k] >> np.uint64(64 - shift)
    return words.view(np.uint8)[:, :bits].tobytes()[:-(-d * bits // 8)]


def unpack(raw: bytes, d: int, bits: int, dtype=np.uint64) -> np.ndarray:
    """``pack``'s inverse (as ``dtype``), checked for its exact size. Eight values of ``bits`` bits fill
    ``bits`` bytes exactly, so value ``k`` of every group of eight starts at the same byte and
    bit of its group: each is read from a few byte columns, in 32-bit words where they fit (no
    per-value gather; 4-6x faster than reading each value's bytes by index at d = 10^6)."""
    need = -(-d * bits // 8)
    if len(raw) != need:
        raise ValueError(f"a packed vector of {d} x {bits} bits is {need} bytes, got {len(raw)}")
    groups = -(-d // 8)
    buf = np.frombuffer(raw, dtype=np.uint8)
    if groups * bits != need:
        buf = np.concatenate([buf, np.zeros(groups * bits - need, dtype=np.uint8)])
    rows = buf.reshape(groups, bits)
    w = np.uint32 if bits <= 25 else np.uint64  # a value and its shift (< 8) fit 32 bits
    out = np.empty((groups, 8), dtype=w)
    for k in range(8):
        off, shift = divmod(k * bits, 8)
        word = rows[:, off].astype(w)
        for j in range(1, -(-(shift + bits) // 8)):
            word |= rows[:, off + j].astype(w) << w(8 * j)
        out[:, k] = (word >> w(shift)) & w((1 << bits) - 1)
    return out.reshape(-1)[:d].astype(dtype)
