"""A deployed client's side of secure aggregation (``[secure]``; docs/secure-aggregation.md).

After training, the client encodes its update for the secure sum (``SecureSum.encode``, the key
the simulation uses) and keeps it: the server gets the header alone. It then answers the four
``STAGE`` requests of that round with ``secagg.Client``'s steps, the simulation's. What it
checks before it answers, so that a server cannot make it reveal more than the protocol does:

* one protocol run per round, its stages in order, each once (a second stage-1 request for the
  same round, or a repeated unmask request, is refused);
* the setup: its round, the vector length, and the neighbours, threshold and ring its own
  config derives for that cohort (``Setup.check``): a server cannot lower the threshold;
* every request's size before it is read, ids within the neighbourhood and each once
  (``atoll.secure.stagewire``);
* the cohort: at least its policy's ``secure.min_cohort`` clients, and with
  ``aggregator.bucket`` at least a bucket (the server learns every cohort's sum);
* the honest-client safety rule of ``secagg.Client.unmask``: never both shares of one neighbour;
* with ``[secure] malicious`` (``atoll.secure.active``): each neighbour's keys are signed by the
  key of its enrolment certificate, which this client's CA signed and which names that neighbour's
  id; and the consistency check (stage 4): shares are revealed (stage 5) only when ``threshold``
  neighbours signed the survivor set this client signed. A token-enrolled client has no
  certificate to sign with and cannot join such a run (``Client`` refuses it when it joins).

A refused request is answered with an empty message (the server drops this client from the
round at once) and logged with its reason; the client takes the next round as usual.
"""
from __future__ import annotations

import logging
import time

from atoll import tree as T
from atoll.runtime.check import decode_update
from atoll.runtime.secure_round import layout, summand
from atoll.transport import wire
from atoll.secure import active as A
from atoll.secure import secagg
from atoll.secure import stagewire as W

log = logging.getLogger("atoll.deploy")


def identity(secure, creds: dict) -> tuple:
    """``(identity, ca)`` for ``[secure] malicious``: the client's enrolment certificate signs
    its keys; a token-enrolled client has none and is refused. ``(None, None)`` otherwise."""
    if not getattr(secure, "malicious", False):
        return None, None
    if creds["cert"] is None or creds["key"] is None or creds["ca"] is None:
        raise ValueError("this run has secure.malicious = true: a client signs its secure "
                         "aggregation keys with its enrolment certificate, and this client has "
                         "none (token enrolment); enrol it with a certificate")
    return A.Identity.enrolled(creds["cert"], creds["key"]), creds["ca"]


class SecureParty:
    def __init__(self, secure, cid: int, num_clients: int, min_cohort: int = 2, identity=None,
                 ca: bytes | None = None):
        self.secure, self.cid, self.num_clients = secure, cid, num_clients
        self.min_cohort = min_cohort  # the client policy's floor (policy.secure.min_cohort)
        self.malicious = getattr(secure, "malicious", False)  # SecureSum's, HomomorphicSum's
        if self.malicious and (identity is None or ca is None):
            raise ValueError("secure.malicious = true needs the client's enrolment certificate, "
                             "its key and the deployment's CA (a token-enrolled client has none)")
        self.identity, self.pki = identity, ca and A.CertificatePKI(ca)
        self.round, self.x, self.party, self.next = None, None, None, 0
        self.refused: list[str] = []

    def start(self, algorithm, message: bytes, like: dict, r: int, n: int, key: int,
              seed: int) -> None:
        """Round ``r``'s encoded input from the client's own update ``message``: its summand
        laid out as the coordinator reads it (``runtime.secure_round.layout``)."""
        x = self.secure.encode(self.summand(algorithm, message, like, r, seed), n, key)
        self.round, self.x, self.party, self.next = r, x, None, 1

    @staticmethod
    def summand(algorithm, message: bytes, like: dict, r: int, seed: int) -> dict:
        """What this client adds into round ``r``'s sum (its update, checked, then its aux)."""
        delta, aux = decode_update(algorithm, message, like)  # aux in aux_spec order
        lay = layout(algorithm, like, seed, r)
        if not lay.plain:  # a linear codec: its payload goes into the sum, decoded once after
            delta = T.split(wire.loads(message))["delta"]
        return summand(lay, delta, aux)

    def answer(self, r: int, stage: int, data: bytes) -> tuple[bytes, float]:
        """``(answer bytes, crypto seconds)``; ``b""`` where the request is refused (logged).
        The seconds are this thread's CPU time, so that clients sharing a machine's cores (the
        benches) each report their own work, not the wait for a core."""
        try:
            t0 = time.thread_time()
            out = self._step(r, stage, data)
            return out, time.thread_time() - t0
        except Exception as exc:  # noqa: BLE001 (hostile bytes: a refusal, never a crash)
            why = f"round {r}: refused secure stage {stage}: {type(exc).__name__}: {exc}"
            log.warning("%s", why)
            self.refused.append(why)
            if r == self.round:
                self.next = 99  # no further stage of this round
            return b"", 0.0

    def _step(self, r: int, stage: int, data: bytes) -> bytes:
        if r != self.round or stage != self.next or stage > (5 if self.malicious else 4):
            raise secagg.SecAggError(f"expected stage {self.next} of round {self.round}, each once, "
                                     "in order")
        self.next += 1
        if stage == 1:
            setup = W.read_setup(data, self.num_clients)
            self.secure.check(setup, self.cid, r, len(self.x))
            if len(setup.clients) < self.min_cohort:
                raise secagg.SecAggError(f"client {self.cid}: refused the setup: a cohort of "
                                         f"{len(setup.clients)} clients, fewer than this client's "
                                         f"policy secure.min_cohort = {self.min_cohort}")
            if not self.malicious:
                self.party = secagg.Client(setup, self.cid)
                return W.keys_bytes(self.party.advertise())
            self.party = A.ActiveClient(setup, self.cid, identity=self.identity, pki=self.pki)
            return W.advert_bytes(self.party.advertise())
        p, mal = self.party, self.malicious
        if stage == 2:
            mine = p.setup.graph()[self.cid]
            return W.records(p.share(W.read_advert_map(data, mine) if mal else W.read_key_map(data, mine)))
        if stage == 3:
            inbox = W.read_records(data, W.CT, p.peers, "inbox")
            return p.masked(self.secure.ring(self.x, p.setup), inbox)
        allowed = set(p.inbox) | {self.cid}
        if mal and stage == 4:
            return p.check(W.read_records(data, 0, p.setup.clients, "survivor set"))
        if mal:
            return W.shares_bytes(p.unmask(*W.read_unmask(data, allowed, p.ids)))
        return W.shares_bytes(p.unmask(*W.read_request(data, allowed)))
