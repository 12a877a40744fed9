"""The bytes of a round's downlink: one broadcast for everyone, or the per-client (US 2025/0265475 A1) deltas.

Without a tracker every sampled client receives the same message (the broadcast, serialised
once). With ``algorithm.tracker`` (``atoll.downlink.DeltaTracker``) each sampled client receives
the coordinates that changed since the model it holds (``tracker.messages``), next to the
broadcast's other entries (e.g. SCAFFOLD's control variate), and when an anchor is due every
client of the federation receives the anchor message first. Each message is serialised by
``wire`` and its length counted.

In simulation the client then trains from the server's parameters: by the tracker's invariant
(tested in ``tests/downlink``) they are bit-identical to what the client holds after applying
its message, so keeping a model per simulated client would only cost memory. A deployment
(``atoll.deploy.downlink``) sends these same messages and its clients do keep their copy.
"""
from __future__ import annotations

from dataclasses import replace

from atoll import tree as T
from atoll.transport import wire
from atoll.types import ServerState


def downlink_bytes(algorithm, state: ServerState, cohort: list[int],
                   shared: bytes) -> tuple[list[int], int, ServerState]:
    """``(bytes each cohort client receives, bytes of an anchor broadcast to every client of the
    federation (0 if none is due), the state after sending)``."""
    tracker = algorithm.tracker
    if tracker is None:
        return [len(shared)] * len(cohort), 0, state
    ts = state.extra["tracker"]
    anchor = 0
    if tracker.anchor_due(ts):
        msg, ts = tracker.anchor(ts, state.params)
        anchor = len(wire.dumps(msg)) * tracker.num_clients
    rest = {k: v for k, v in algorithm.broadcast(state).items() if k != "params"}
    rest_bytes = len(wire.dumps(T.join(rest))) if rest else 0
    messages, ts = tracker.messages(ts, cohort, state.params)
    known: dict[int, int] = {}  # clients with the same base share one message object
    sizes = []
    for m in messages:
        if id(m) not in known:
            known[id(m)] = len(wire.dumps(m))
        sizes.append(known[id(m)] + rest_bytes)
    return sizes, anchor, replace(state, extra={**state.extra, "tracker": ts})
