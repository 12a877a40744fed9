"""Per-client fingerprinted copies in deployment (``[watermark] fingerprint = true``;
docs/watermark.md, "Fingerprints").

Each sampled client receives its own copy of the model with its code embedded
(``Algorithm.client_copy``: ``atoll.watermark.FingerprintCopies``, FedTracker's local
fingerprints), so a leaked copy traces
to the client that received it (``atoll audit watermark``). The server keeps and aggregates the
unmarked model: a client's update is relative to its copy and the mean update steps the global
model. The copies go out through the coordinator's per-client downlink (an object with
``task(cid, held)`` and no ``anchor``, like the tracker's round), so nothing else in the round
changes, a secure sum included. The code bits are drawn from the server's watermark key, which
never leaves it; a client sees only its own copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from atoll.runtime.round import copies_bytes


@dataclass
class FingerprintedRound:
    messages: dict                                # client -> its copy's broadcast bytes
    anchor: None = None                           # no anchors: every task is a whole broadcast
    anchored: set = field(default_factory=set)

    def task(self, cid: int, held=None) -> bytes:
        return self.messages[cid]


def open_round(algorithm, state, cohort: list[int], seed: int) -> FingerprintedRound:
    """Round ``state.round + 1``'s broadcast for each client of ``cohort``, each with its code
    (``Algorithm.client_copy``; the bytes are ``runtime.round.copies_bytes``, as in simulation)."""
    return FingerprintedRound(copies_bytes(algorithm, state, cohort, seed, algorithm.client_copy))
