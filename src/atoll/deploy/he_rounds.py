"""Homomorphic encryption in deployment: the coordinator's side (docs/secure-aggregation.md).

The round has the simulation's shape (``HomomorphicSum.aggregate``): after the training phase
the clients that answered (their header only) get one ``STAGE`` request, ``request_bytes``:
the round, the coordinates ``d``, the cohort's size and the fingerprint of the public key the
server sums under. Each answers with its update encrypted under the public key it pinned itself
(``deploy.he_client``), at most ``he_keys.max_blob`` bytes, read no further. The server sums
the ciphertexts that load (the others are dropped with their reason), and ``Decryptors`` sends
the one summed ciphertext to every decryptor (``atoll he serve``) and combines their replies
into the plaintext sum. With ``[secure] malicious`` each answer is the ciphertext signed by the
client's enrolment key (``secure.he_signed``); the server drops an answer whose signature does
not verify against its CA, and sends every decryptor the signed inputs it kept instead of their
sum (the decryptors check the signatures and sum them themselves). A decryptor that is down,
refuses or returns what does not combine ends the round with ``HEError``: the model stays as
it was, the reason in ``failures`` and the log.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from atoll.deploy.secure_rounds import SecureRounds, _Stats
from atoll.secure import he_keys, he_signed
from atoll.secure.he import HEError, RemoteHolder
from atoll.secure.secagg import SecAggError
from atoll.secure.stage import SecureSum

log = logging.getLogger("atoll.deploy")
MAX_REQUEST = 512  # bytes of a request a client reads


def run_id(config_toml: str) -> str:
    """The run's id, as a client derives it from the config the server sent (``Client``)."""
    return hashlib.sha256(config_toml.encode()).hexdigest()[:16]


def request_bytes(r: int, d: int, cohort: int, fingerprint: str) -> bytes:
    return json.dumps({"round": r, "d": d, "cohort": cohort, "fingerprint": fingerprint}).encode()


def read_request(data: bytes) -> dict:
    """A request's fields, checked for size and type before use; ValueError naming the field."""
    if len(data) > MAX_REQUEST:
        raise ValueError(f"he request of {len(data)} bytes (at most {MAX_REQUEST})")
    try:
        req = json.loads(data)
    except ValueError:
        raise ValueError("he request is not JSON") from None
    want = {"round": int, "d": int, "cohort": int, "fingerprint": str}
    if not isinstance(req, dict) or set(req) != set(want):
        raise ValueError(f"he request fields must be {sorted(want)}")
    for k, t in want.items():
        if type(req[k]) is not t:
            raise ValueError(f"he request field {k!r} must be {t.__name__}")
    return req


class HeRounds(SecureRounds):
    """The coordinator's HE phase of a round; ``secure``: the stage with its ``RemoteHolder``."""

    def __init__(self, secure, fingerprint: str, stage_timeout: float, cond):
        super().__init__(secure, stage_timeout, cond)
        self.fingerprint, self.run_id = fingerprint, b""  # run_id: the server's (malicious)

    def run(self, rnd, ids: list[int], like: dict, stop) -> tuple[dict | None, dict]:
        stats = _Stats()
        try:
            d = sum(v.numel() for v in like.values()) + 1
            limit = he_keys.max_blob(self.secure.holder.public.scheme, d)
            req = request_bytes(rnd.r, d, len(ids), self.fingerprint)
            signed, parse = {}, lambda u, raw: raw
            if self.secure.malicious:
                limit += he_signed.OVERHEAD
                parse = functools.partial(self._signed, signed, rnd.r, limit)
            got = self._stage(rnd, stats, 1, {u: req for u in ids}, {u: limit for u in ids},
                              parse, self.secure.min_clients, stop)
            if self.secure.malicious:
                self.secure.holder.call.hold(rnd.r, self.run_id, signed)
            mean, extra = stats.timed(self.secure.aggregate, got, rnd.r, like)
        except (SecAggError, ValueError) as exc:  # HEError is a SecAggError
            why = f"homomorphic sum failed: {exc}"
            rnd.stats.failures.append((-1, why))
            log.warning("round %d: %s; model unchanged", rnd.r, why)
            return None, stats.line(None, 0)
        extra["secure_decryptor_bytes"] = self.secure.holder.call.sent  # to each decryptor
        for cid, why in extra.pop("secure_rejected"):
            rnd.stats.failures.append((cid, why))
            log.warning("round %d: %s", rnd.r, why)
        return mean, {**stats.line(None, 0), **extra}

    def _signed(self, signed: dict, r: int, limit: int, u: int, raw: bytes) -> bytes:
        """Client ``u``'s ciphertext from its signed answer (kept in ``signed`` for the
        decryptors); ValueError (the client is dropped) when it is not signed by ``u``."""
        try:
            ct, sig, cred = he_signed.unseal(raw, limit)
            he_signed.verify(self.pki, self.run_id, r, [(u, ct, sig, cred)], 1)
        except HEError as exc:
            raise ValueError(str(exc)) from None
        signed[u] = (ct, sig, cred)
        return ct


def secure_rounds(algorithm, policy, cond, he):
    """[secure]'s phase after training: the four SecAgg stages, or the HE request and the
    decryptors (``he``: ``(stage with its remote holder, key fingerprint)``, ``he_rounds.link``)."""
    if algorithm.secure is None:
        return None
    if isinstance(algorithm.secure, SecureSum):
        return SecureRounds(algorithm.secure, policy.stage_timeout, cond, quorum=policy.stage_quorum)
    if he is None:
        raise ValueError(f"secure.method = {algorithm.secure.scheme!r} in deployment needs the "
                         "dealer's public key and the decryptors (atoll server --he-public-key "
                         "FILE --he-decryptor HOST:PORT ...; docs/secure-aggregation.md)")
    return HeRounds(he[0], he[1], policy.stage_timeout, cond)


class Decryptors:
    """``decrypt(round, cts, count, d)`` of a ``RemoteHolder``: the summed ciphertext to every
    decryptor at once (``calls``: name -> ``(round, count, d, blob, max_reply) -> bytes``),
    their replies combined (``he_keys.combine``)."""

    def __init__(self, public: he_keys.Public, calls: dict):
        if len(calls) != public.decryptors:
            raise ValueError(f"he: the public key was dealt to {public.decryptors} decryptors, "
                             f"{len(calls)} given (every share is needed)")
        self.scheme, self.calls = public.scheme, calls
        self.signed, self.sent = None, 0  # (round, run, {client: signed input}); bytes to each

    def hold(self, round_: int, run: bytes, signed: dict) -> None:
        """``[secure] malicious``: round ``round_``'s signed inputs, sent in place of the sum."""
        self.signed = (round_, run, signed)

    def __call__(self, round_: int, cts: list, count: int, d: int, kept=()):
        run = None
        if self.signed is not None:  # malicious: the kept clients' signed inputs, not the sum
            r, run, signed = self.signed
            if r != round_ or not set(kept) <= set(signed):
                raise HEError(f"he: no signed inputs held for round {round_}'s clients {sorted(kept)}")
            blob = he_signed.bundle({c: signed[c] for c in kept})
        else:
            blob = self.scheme.dump(cts)
        ckks = isinstance(self.scheme, he_keys.S.Ckks)
        most = 8 * d if ckks else self.scheme.chunks(d) * self.scheme.width
        self.sent = len(blob)
        with ThreadPoolExecutor(len(self.calls)) as pool:
            jobs = {n: pool.submit(f, round_, count, d, blob, most, run) for n, f in self.calls.items()}
        replies = {}
        for name, job in jobs.items():
            try:
                replies[name] = job.result()
            except Exception as exc:  # noqa: BLE001 -- down, refused, or a broken reply
                raise HEError(f"he: decryptor {name} failed: {exc}") from None
        return he_keys.combine(self.scheme, replies, count, d)


def link(stage, public_key, decryptors: list[str], *, ca=None, token=None, insecure=False,
         timeout: float = 600.0):
    """The server's stage, its decryptors and the key's fingerprint from ``atoll server``'s
    ``--he-*`` options: ``ca``/``token``: one path for all decryptors, or one per decryptor."""
    from atoll.transport.grpc.he import DecryptorChannel

    public = he_keys.load_public(public_key)
    if public.method != stage.scheme:
        raise ValueError(f"he: {public_key} holds a {public.method} key, the config's "
                         f"secure.method is {stage.scheme!r}")
    if public.method == "paillier" and public.decryptors != stage.decryptors:
        raise ValueError(f"he: {public_key} was dealt to {public.decryptors} decryptors, the "
                         f"config's secure.decryptors is {stage.decryptors}")
    cas, tokens = _each(ca, len(decryptors), "--he-ca"), _each(token, len(decryptors), "--he-token")
    calls = {}
    for addr, c, t in zip(decryptors, cas, tokens):
        ch = DecryptorChannel(addr, ca=None if c is None else Path(c).read_bytes(),
                              token=None if t is None else Path(t).read_text().strip(),
                              insecure=insecure, timeout=timeout)
        calls[addr] = ch.decrypt
    holder = RemoteHolder(public.scheme, Decryptors(public, calls), stage.min_clients)
    return stage.with_holder(holder), public.fingerprint


def _each(v, k: int, flag: str) -> list:
    v = v if isinstance(v, (list, tuple)) else [v]
    if len(v) == 1:
        return list(v) * k
    if len(v) != k:
        raise ValueError(f"{flag}: give one for all decryptors or one per decryptor ({k})")
    return list(v)
