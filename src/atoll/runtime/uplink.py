"""The client half after training, for the fast runtimes: one wire message per client.

``encode_chunk`` turns a chunk's stacked results into one real ``wire`` message per client
(the uplink codec runs on the client's slice of the stacked delta with the client's own key),
so the server half (``runtime.round.close_round``) reads exactly what ``client_round`` writes.

Identity uplink (``Codec.plain``: the codec sends the delta as it is, and keeps no
state): every message of a round has one structure, so the messages are rows of one
``wire.Rows`` buffer (an engine may write its deltas straight into them), and the server reads
them back with ``wire.Layout.stack``: in place when they are still equally spaced rows of one
buffer. The bytes are those ``wire.dumps`` writes.
"""
from __future__ import annotations

from typing import Any

from torch.utils._pytree import tree_map

from atoll import rng
from atoll import tree as T
from atoll.runtime.base import Outcome
from atoll.runtime.round import encode_aux, uplink_codec
from atoll.transport import wire



def split_state(cstate: dict) -> tuple[Any, dict]:
    """``(uplink codec state, the rest)`` of a client state."""
    return cstate["uplink"], {k: v for k, v in cstate.items() if k != "uplink"}


def encode_chunk(algorithm, chunk, result, uplink_states: list, seed: int, r: int,
                 rows: wire.Rows | None = None, start: int = 0) -> list[Outcome]:
    """Encode each client's row of ``result`` (a ``ChunkResult``) into a wire message: rows
    ``start ..`` of ``rows`` where given (identity uplink, same layout), else one ``dumps``
    per client."""
    stacked = T.join({"delta": result.delta, "aux": result.aux})
    if rows is not None and fits_layout(rows.layout, stacked):
        for name, v in stacked.items():
            rows.fill(name, v, start)
        messages, ups = rows.messages[start:start + len(chunk)], uplink_states  # identity: unchanged
    else:
        messages, ups, codec = [], [], uplink_codec(algorithm, seed, r)
        per_client = [dict(zip(result.delta, vs))
                      for vs in zip(*(v.unbind() for v in result.delta.values()))]
        for i, p in enumerate(chunk):
            up_key = rng.key(seed, r, p.cid, "uplink")
            payload, up = codec.encode(per_client[i], uplink_states[i], up_key)
            aux = encode_aux(algorithm, {k: v[i] for k, v in result.aux.items()}, up_key)
            messages.append(wire.dumps(T.join({"delta": payload, "aux": aux})))
            ups.append(up)
    if not result.client_state:
        return [Outcome(p.pos, p.cid, m, {"uplink": up}, loss, seen, p.straggler)
                for p, m, up, loss, seen in zip(chunk, messages, ups, result.loss, result.samples)]
    out = []
    for i, p in enumerate(chunk):
        rest = tree_map(lambda v, i=i: v[i].clone(), result.client_state)  # not a view of the chunk
        out.append(Outcome(p.pos, p.cid, messages[i], {**rest, "uplink": ups[i]}, result.loss[i],
                           result.samples[i], p.straggler))
    return out


def fits_layout(layout: wire.Layout, stacked: dict) -> bool:
    """Whether one row of ``stacked`` ``(C, ...)`` entries has ``layout`` (names, dtypes,
    shapes, in order)."""
    return list(layout.entries) == list(stacked) and all(
        e[0] == v.dtype and e[1] == tuple(v.shape[1:])
        for e, v in zip(layout.entries.values(), stacked.values()))
