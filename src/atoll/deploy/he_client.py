"""A deployed client's side of homomorphic encryption (``[secure] method = "ckks" | "paillier"``).

The client encrypts under the public key it PINNED itself (its policy's
``secure.he_public_key``, ``atoll client --he-public-key FILE``: the dealer's ``public.key``),
never under a key the server sends: a server that substituted its own key would decrypt the
update (``tests/deploy/test_he.py``). After training it keeps its summand (the simulation's,
``runtime.secure_round.summand``) and answers the round's one ``STAGE`` request with it,
encrypted, after these checks:

* one answer per round, for the round it trained in (a repeated request is refused);
* the request's ``d`` is this client's summand's length, its cohort at least the policy's
  ``secure.min_cohort`` and the stage's ``min_clients``;
* the request's key fingerprint is the pinned key's (a server using another key is refused:
  its sum could not be decrypted by the dealer's decryptors, or it is an attack).

With ``[secure] malicious`` the answer is the ciphertext signed with the client's enrolment key
for (run, round, its id, the ciphertext's SHA-256) (``secure.he_signed.seal``): the decryptors
open only sums of such inputs from distinct clients, so the server cannot pass one client's
ciphertext off as a sum. A token-enrolled client has no key to sign with and refuses the run.

A refused request is answered with an empty message and logged, as ``deploy.secure_client``.
"""
from __future__ import annotations

import logging
import time

from atoll.deploy.he_rounds import read_request
from atoll.deploy.policy import PolicyError
from atoll.deploy.secure_client import SecureParty
from atoll.secure import he_keys, he_signed
from atoll.secure.he import HEError, RemoteHolder

log = logging.getLogger("atoll.deploy")


class HeParty(SecureParty):
    def __init__(self, secure, cid: int, num_clients: int, min_cohort: int, public_key,
                 identity=None, ca: bytes | None = None, run: str = ""):
        pinned = he_keys.load_public(public_key)
        if pinned.method != secure.scheme:
            raise PolicyError(f"refused by this client's policy: the server's secure.method = "
                              f"{secure.scheme!r}, the pinned key {public_key} is {pinned.method}")
        super().__init__(secure.with_holder(RemoteHolder(pinned.scheme)), cid, num_clients,
                         min_cohort, identity, ca)
        self.fingerprint, self.run = pinned.fingerprint, run.encode()

    def start(self, algorithm, message: bytes, like: dict, r: int, n: int, key: int,
              seed: int) -> None:
        """Keep round ``r``'s summand and record count; encryption waits for the request."""
        self.x, self.n = self.summand(algorithm, message, like, r, seed), n
        self.round, self.next = r, 1

    def answer(self, r: int, stage: int, data: bytes) -> tuple[bytes, float]:
        try:
            t0 = time.perf_counter()
            self._check(r, stage, data)
            out = self.secure.encode(self.x, self.n, 0)  # randomness: the OS's, this client's
            if self.malicious:
                out = he_signed.seal(self.identity, self.run, r, self.cid, out)
            return out, time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 (hostile bytes: a refusal, never a crash)
            why = f"round {r}: refused the he request: {type(exc).__name__}: {exc}"
            log.warning("%s", why)
            self.refused.append(why)
            return b"", 0.0

    def _check(self, r: int, stage: int, data: bytes) -> None:
        if r != self.round or stage != 1 or self.next != 1:
            raise HEError(f"expected one request for round {self.round}, got stage {stage} of round {r}")
        self.next = 2
        req = read_request(data)
        d = sum(v.numel() for v in self.x.values()) + 1
        if req["round"] != r or req["d"] != d:
            raise HEError(f"the request is for round {req['round']} and d = {req['d']}, this "
                          f"client trained round {r} with d = {d}")
        floor = max(self.min_cohort, self.secure.min_clients)
        if req["cohort"] < floor:
            raise HEError(f"client {self.cid}: a cohort of {req['cohort']} clients, fewer than "
                          f"{floor} (policy secure.min_cohort)")
        if req["fingerprint"] != self.fingerprint:
            raise HEError(f"client {self.cid}: the server sums under key {req['fingerprint'][:16]}..., "
                          f"not the pinned key {self.fingerprint[:16]}... (refused: a substituted "
                          "key would let its owner read this client's update)")


def is_he(secure) -> bool:
    return secure is not None and getattr(secure, "scheme", None) in ("ckks", "paillier")
