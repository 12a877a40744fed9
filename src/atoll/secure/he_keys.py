"""Homomorphic encryption's keys in deployment: the dealer's files and a decryptor's side.

``keygen(method, decryptors, out)`` (``atoll he keygen``) is the dealer: it makes one key pair,
writes ``public.key`` (what clients pin and the server uses) and one ``share-<i>.key`` per
decryptor (mode 0600), and keeps nothing: the secret exists only in the share files. Paillier
splits the decryption exponent additively between ``decryptors`` parties (all must apply their
share); CKKS has one key holder (TenSEAL has no threshold decryption), so ``decryptors`` is 1.

A key file is a magic line ``atoll-he/1 <scheme> <public|share>`` and its body (Paillier: JSON
of hex integers; CKKS: TenSEAL's serialized context). ``fingerprint`` is the SHA-256 of the
public file's bytes: the identity of the key a client encrypts under.

``Decryptor(share)`` is what ``atoll he serve`` runs: it decrypts (CKKS) or partially decrypts
(Paillier) at most one summed ciphertext per round, of at least ``min_clients`` updates, and
checks the ciphertext's size before it parses a byte. That count is the server's word: a
malicious server can send one client's ciphertext as a "sum". ``Decryptor(share, pki=...)``
(``he serve --client-ca``, ``[secure] malicious``) opens only inputs each signed by an enrolled
client (``atoll.secure.he_signed``), sums them itself and refuses a summed ciphertext.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atoll.secure import he_schemes as S
from atoll.secure import he_signed
from atoll.secure.he import HEError

MAGIC = b"atoll-he/1"
MAX_FILE = 64 << 20  # a key file larger than this is refused before it is read
MAX_D = 1 << 27      # the most coordinates a decryptor accepts a sum of


@dataclass(frozen=True)
class Public:
    method: str       # "ckks" | "paillier"
    decryptors: int   # shares the dealer wrote (all are needed)
    scheme: object    # he_schemes.Ckks / Paillier holding the public key only
    fingerprint: str  # sha256 of the file's bytes


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def keygen(method: str, decryptors: int, out, key_bits: int = 2048) -> dict:
    """Write ``public.key`` and ``share-1.key`` ... ``share-T.key`` in ``out``; returns their
    paths and the public key's fingerprint."""
    if method not in ("ckks", "paillier"):
        raise ValueError(f"he keygen: method must be 'ckks' or 'paillier', got {method!r}")
    if method == "ckks" and decryptors != 1:
        raise ValueError("he keygen: CKKS has one key holder (--decryptors 1); TenSEAL has no "
                         "threshold decryption")
    if decryptors < 1 or key_bits < 1024:
        raise ValueError(f"he keygen: --decryptors >= 1 and --bits >= 1024, got {decryptors}, {key_bits}")
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    if method == "ckks":
        s = S.Ckks()
        public, shares = s.public.serialize(), [s.secret.serialize(save_secret_key=True)]
    else:
        phe = S._need("phe")
        pub, priv = phe.generate_paillier_keypair(n_length=key_bits)
        p = S.Paillier(key_bits, decryptors, n=pub.n)
        head = {"n": hex(pub.n), "key_bits": key_bits, "decryptors": decryptors}
        public = json.dumps(head).encode()
        shares = [json.dumps({**head, "index": i + 1, "share": hex(x)}).encode()
                  for i, x in enumerate(p.deal(priv.p, priv.q, decryptors))]
        del priv  # the dealer forgets p, q: the shares are the only secret left
    pub_path = d / "public.key"
    pub_bytes = _header(method, "public", decryptors) + public
    _write(pub_path, pub_bytes, 0o644)
    paths = []
    for i, body in enumerate(shares, start=1):
        paths.append(d / f"share-{i}.key")
        _write(paths[-1], _header(method, "share", decryptors) + body, 0o600)
    return {"public": pub_path, "shares": paths, "fingerprint": fingerprint(pub_bytes)}


def _header(method: str, kind: str, t: int) -> bytes:
    return MAGIC + f" {method} {kind} {t}\n".encode()


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read(path, kind: str) -> tuple[str, int, bytes, bytes]:
    """``(method, decryptors, body, whole file)`` of a key file; ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"he: key file {path} does not exist")
    if path.stat().st_size > MAX_FILE:
        raise ValueError(f"he: key file {path} is larger than {MAX_FILE} bytes")
    data = path.read_bytes()
    line, _, body = data.partition(b"\n")
    parts = line.split(b" ")
    if (len(parts) != 4 or parts[0] != MAGIC or parts[1] not in (b"ckks", b"paillier")
            or parts[2] != kind.encode() or not parts[3].isdigit()):
        raise ValueError(f"he: {path} is not an atoll {kind} key file (first line {line[:60]!r})")
    return parts[1].decode(), int(parts[3]), body, data


def load_public(path) -> Public:
    """The public key a client pins (or the server uses); ValueError naming the file."""
    method, t, body, data = _read(path, "public")
    try:
        scheme = S.Ckks(public=body) if method == "ckks" else _paillier(json.loads(body))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"he: {path}: {exc}") from None
    return Public(method, t, scheme, fingerprint(data))


def _paillier(head: dict):
    n, bits = int(head["n"], 16), int(head["key_bits"])
    if bits < 1024 or n.bit_length() != bits or n % 2 == 0:
        raise ValueError(f"not a {bits}-bit Paillier modulus")
    return S.Paillier(bits, int(head["decryptors"]), n=n)


class Decryptor:
    """One decryptor's side (``atoll he serve``): its share, the rounds it has served."""

    def __init__(self, share_path, min_clients: int = 2, pki=None, ledger=None):
        self.method, self.t, body, _ = _read(share_path, "share")
        try:
            if self.method == "ckks":
                self.scheme, self.share = S.Ckks(secret=body), None
            else:
                head = json.loads(body)
                self.scheme, self.share = _paillier(head), int(head["share"], 16)
                self.index = int(head["index"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"he: {share_path}: {exc!r}") from None
        self.min_clients, self.rounds, self.lock = min_clients, set(), threading.Lock()
        self.pki = pki  # secure.active.CertificatePKI: open signed inputs only (he_signed)
        # the rounds opened, (run, round), kept across restarts: reopening a round with another
        # set of inputs would let a server take the difference of two sums
        self.ledger = None if ledger is None else Path(ledger)
        if self.ledger is not None and self.ledger.exists():
            self.rounds = _read_ledger(self.ledger)

    @property
    def opened(self) -> set[int]:
        """The round numbers opened (of any run)."""
        return {r for _, r in self.rounds}

    def max_bytes(self, d: int) -> int:
        """The largest request accepted for ``d`` coordinates (0: ``d`` is refused)."""
        return max_blob(self.scheme, d) if 1 <= d <= MAX_D else 0

    def reply_bytes(self, d: int) -> int:
        return 8 * d if self.share is None else self.scheme.chunks(d) * self.scheme.width

    def decrypt(self, round_: int, count: int, d: int, blob: bytes) -> bytes:
        """The reply to one request: CKKS: the sum's ``d`` float64 values; Paillier: this
        share's partial decryption (units mod n^2). HEError naming what was refused."""
        if self.pki is not None:
            raise HEError("he: this decryptor opens only signed inputs (he serve --client-ca, "
                          "secure.malicious = true), never a sum the server made")
        return self._open(("", round_), count, d, lambda: self.scheme.parse(blob, d))

    def max_signed(self, d: int, count: int) -> int:
        """The largest bundle of ``count`` signed inputs accepted for ``d`` coordinates."""
        ok = 1 <= d <= MAX_D and self.min_clients <= count <= he_signed.MAX_INPUTS
        return he_signed.max_bundle(count, max_blob(self.scheme, d)) if ok else 0

    def decrypt_signed(self, round_: int, run: bytes, count: int, d: int, raw: bytes) -> bytes:
        """``decrypt`` of the sum of ``count`` inputs each signed for ``(run, round_)`` by a
        distinct client of ``pki``, summed here (``he_signed``); HEError naming what was refused."""
        if self.pki is None:
            raise HEError("he: this decryptor has no client CA (he serve --client-ca): it opens "
                          "one summed ciphertext, not signed inputs")
        if not self.min_clients <= count <= he_signed.MAX_INPUTS:
            raise HEError(f"he: {count} signed inputs announced, not in [{self.min_clients}, "
                          f"{he_signed.MAX_INPUTS}]")

        def total():
            inputs = he_signed.unbundle(raw, count, max_blob(self.scheme, d))
            he_signed.verify(self.pki, run, round_, inputs, self.min_clients)
            cts = [self._parse(ct, d, cid) for cid, ct, _, _ in inputs]
            out = cts[0]
            for c in cts[1:]:
                out = self.scheme.add(out, c)
            return out
        return self._open((run.hex(), round_), count, d, total)

    def _parse(self, ct: bytes, d: int, cid: int):
        try:
            return self.scheme.parse(ct, d)
        except ValueError as exc:
            raise HEError(f"he: client {cid}'s signed ciphertext does not load: {exc}") from None

    def _open(self, key: tuple[str, int], count: int, d: int, load) -> bytes:
        """The one opening of round ``key = (run, round)`` of the ciphertext ``load()`` returns."""
        if key in self.rounds:
            raise HEError(f"he: this decryptor already decrypted round {key[1]}'s sum (replay)")
        if count < self.min_clients:
            raise HEError(f"he: this decryptor decrypts sums of >= {self.min_clients} updates, got {count}")
        if not 1 <= d <= MAX_D:
            raise HEError(f"he: d = {d} coordinates is outside [1, {MAX_D}]")
        with self.lock:
            if key in self.rounds:
                raise HEError(f"he: this decryptor already decrypted round {key[1]}'s sum (replay)")
            try:
                cts = load()  # sizes checked before anything is loaded
            except ValueError as exc:
                raise HEError(f"he: the summed ciphertext does not load: {exc}") from None
            self.rounds.add(key)
            if self.ledger is not None:  # on disk before the reply leaves
                with open(self.ledger, "a", encoding="ascii") as f:
                    f.write(f"{key[0] or '-'} {key[1]}\n")
                    f.flush()
                    os.fsync(f.fileno())
        if self.share is None:
            return np.ascontiguousarray(self.scheme.decrypt(cts)[:d], "<f8").tobytes()
        return self.scheme.dump(self.scheme.partial(self.share, cts))


MAX_LEDGER = 8 << 20  # bytes: ~200,000 opened rounds


def _read_ledger(path: Path) -> set[tuple[str, int]]:
    """The ``(run, round)`` pairs a decryptor's ledger file lists; ValueError naming the file
    and line for anything else (checked: size, then each line's form)."""
    if path.stat().st_size > MAX_LEDGER:
        raise ValueError(f"he: ledger {path}: over {MAX_LEDGER} bytes")
    out = set()
    for i, line in enumerate(path.read_bytes().split(b"\n")[:-1], 1):
        m = re.fullmatch(rb"(-|[0-9a-f]{1,64}) ([0-9]{1,18})", line)
        if m is None:
            raise ValueError(f"he: ledger {path}, line {i}: not '<run hex or -> <round>'")
        out.add(("" if m[1] == b"-" else m[1].decode(), int(m[2])))
    return out


def max_blob(scheme, d: int) -> int:
    """The largest summed ciphertext of ``d`` coordinates (what a decryptor reads at most)."""
    k = scheme.chunks(d)
    return 4 * (k + 1) + k * scheme.max_blob if isinstance(scheme, S.Ckks) else k * scheme.width


def combine(scheme, replies: dict, count: int, d: int) -> np.ndarray:
    """The plaintext sum from every decryptor's reply (``name -> bytes``); HEError naming the
    decryptor whose reply is malformed, or saying that the partial decryptions do not combine."""
    if isinstance(scheme, S.Ckks):
        (name, raw), = replies.items()
        if len(raw) != 8 * d:
            raise HEError(f"he: decryptor {name} returned {len(raw)} bytes, expected {8 * d}")
        return np.frombuffer(raw, "<f8").astype(np.float64)
    parts = []
    for name, raw in replies.items():
        try:
            parts.append(scheme.parse(raw, d))
        except ValueError as exc:
            raise HEError(f"he: decryptor {name} returned a malformed partial decryption: {exc}") from None
    try:
        return scheme.decode(scheme.combine(parts), count, d)
    except ValueError as exc:
        raise HEError(f"he: decryptors {sorted(replies)}: {exc}") from None
