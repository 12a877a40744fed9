"""``LoopRuntime``: the reference runtime, one client after another.

A round is ``runtime.round``'s: ``open_round`` (the broadcast's bytes), ``client_round`` for
each client in cohort order (a client that raises is dropped with the reason, the others go
on), ``close_round`` (every message decoded from its real ``wire`` bytes and validated by
``runtime.check.decode_update``, then the server step). The fast runtimes run the same server
half and are checked against this one (``tests/runtime``).
"""
from __future__ import annotations

from atoll.algorithm import Algorithm
from atoll.runtime.base import LocalWork
from atoll.runtime.round import client_round, close_round, one_by_one, open_round
from atoll.runtime.work import plan_clients
from atoll.types import ServerState


class LoopRuntime:
    name = "loop"
    client_copies = True  # carries Algorithm.client_copy: each client trains on its own copy
    client_round = staticmethod(client_round)  # one client's half (a test may inject faults here)

    def run_round(self, algorithm: Algorithm, client_update, state: ServerState,
                  client_states: dict, cohort: list[int], data, work: LocalWork, seed: int):
        """One synchronous round over ``cohort``. Returns (state, client_states, stats)."""
        r, stats, down_bytes, state = open_round(algorithm, state, cohort, seed)
        outcomes = one_by_one(algorithm, client_update, down_bytes,
                              plan_clients(cohort, data, r, seed, work),
                              [client_states.get(c) for c in cohort], data, work, seed, r,
                              client=self.client_round)
        state, accepted = close_round(algorithm, state, outcomes, data, work, stats, seed)
        return state, {**client_states, **dict(accepted)}, stats
