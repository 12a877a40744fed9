"""The client half after training and the server half of a round, shared by the fast runtimes.

``encode_chunk`` turns a chunk's stacked results into one real ``wire`` message per client
(the uplink codec runs on the client's slice of the stacked delta with the client's own key);
``finish_round`` then does exactly what ``LoopRuntime.run_round`` does with its messages, in
cohort order: count the bytes, drop stragglers when asked, validate with ``decode_update``
(same rejection reasons), aggregate the accepted deltas and step the server. So byte counts,
failures, client states and the aggregated update equal the loop runtime's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from atoll import rng
from atoll import tree as T
from atoll.runtime.base import RoundStats
from atoll.runtime.loop import LoopRuntime, decode_update
from atoll.transport import wire

log = logging.getLogger("atoll")


@dataclass
class Outcome:
    """One client's round as the server sees it (``error``: the client raised)."""

    pos: int
    cid: int
    message: bytes | None
    state: Any
    loss: float
    samples: float
    straggler: bool
    error: str | None = None


def split_state(cstate: dict) -> tuple[Any, dict]:
    """``(uplink codec state, the rest)`` of a client state."""
    return cstate["uplink"], {k: v for k, v in cstate.items() if k != "uplink"}


def encode_chunk(algorithm, chunk, result, uplink_states: list, seed: int, r: int) -> list[Outcome]:
    """Encode each client's row of ``result`` (a ``ChunkResult``) into a wire message."""
    out = []
    rows = [dict(zip(result.delta, vs)) for vs in zip(*(v.unbind() for v in result.delta.values()))]
    for i, p in enumerate(chunk):
        payload, up = algorithm.uplink.encode(rows[i], uplink_states[i], rng.key(seed, r, p.cid, "uplink"))
        aux = {k: v[i] for k, v in result.aux.items()}
        message = wire.dumps(T.join({"delta": payload, "aux": aux}))
        rest = (tree_map(lambda v, i=i: v[i].clone(), result.client_state)  # not a view of the chunk
                if result.client_state else {})
        out.append(Outcome(p.pos, p.cid, message, {**rest, "uplink": up}, result.loss[i],
                           result.samples[i], p.straggler))
    return out


def one_by_one(algorithm, client_update, down_bytes, chunk, cstates, data, work, seed, r) -> list[Outcome]:
    """The loop runtime's per-client path, used when a batched chunk raised: it finds which
    clients fail and reports them with the loop runtime's reasons."""
    out = []
    for p, cstate in zip(chunk, cstates):
        try:
            message, new, metrics, straggler = LoopRuntime._client(
                algorithm, client_update, down_bytes, cstate, data.clients[p.cid], p.cid, r, work, seed)
        except Exception as exc:  # a failing client must not stop the round
            out.append(Outcome(p.pos, p.cid, None, None, 0.0, 0.0, p.straggler,
                               f"client raised {type(exc).__name__}: {exc}"))
            continue
        out.append(Outcome(p.pos, p.cid, message, new, float(metrics["loss"]),
                           float(metrics["samples"]), straggler))
    return out


class DecodeBuffers:
    """The stacked decode buffers ``(n, ...)``, reused from round to round.

    Allocating ~100 model copies afresh every round page-faults them in again (on this machine
    that was 40,000 faults, ~12 ms, per round of workload B). Invariant: a buffer is reused only
    while nothing the server returned (``ServerState``) shares its memory; ``settle`` checks
    that after every round and otherwise lets the buffer go to its new owner."""

    def __init__(self):
        self._bufs: dict = {}

    def take(self, params, n: int) -> dict:
        out = {}
        for k, p in params.items():
            buf = self._bufs.get(k)
            if buf is None or buf.shape[0] < n or buf.shape[1:] != p.shape or buf.dtype != p.dtype:
                buf = self._bufs[k] = p.new_empty((n, *p.shape))
            out[k] = buf[:n]
        return out

    def settle(self, state) -> None:
        held = {t.untyped_storage().data_ptr() for t in tree_flatten(
            (state.params, state.opt_state, state.extra))[0] if isinstance(t, torch.Tensor)}
        if any(b.untyped_storage().data_ptr() in held for b in self._bufs.values()):
            self._bufs = {}


def finish_round(algorithm, state, outcomes: list[Outcome], data, work, stats: RoundStats,
                 buffers: DecodeBuffers | None = None, key: int = 0):
    """Validate and aggregate ``outcomes`` (any order) as ``LoopRuntime`` does.

    Every message is decoded from its bytes and copied at once, while still in cache, into one
    stacked buffer per entry; a cheap screen (entries, shapes, floating dtype, finite row sums)
    passes the normal message, and any message it doubts gets the loop runtime's
    ``decode_update`` for the verdict and the reason. Returns ``(state, accepted)``, where
    ``accepted`` lists ``(cid, new client state)``.
    """
    r = state.round + 1
    failures, todo = [], []
    for o in sorted(outcomes, key=lambda o: o.pos):
        if o.error is not None:
            failures.append((o.pos, o.cid, o.error))
            continue
        stats.bytes_up += len(o.message)
        stats.up_bytes[o.cid] = len(o.message)
        if o.straggler and work.drop_stragglers:
            stats.stragglers_dropped += 1
            continue
        todo.append(o)
    buffers = buffers or DecodeBuffers()
    deltas, kept = _decode_all(algorithm, todo, buffers.take(state.params, len(todo)), state.params,
                               failures)
    for _, cid, why in sorted(failures):
        stats.failures.append((cid, why))
        log.warning("round %d: client %d dropped: %s", r, cid, why)
    for o, _ in kept:
        stats.loss_sum += o.loss * o.samples
        stats.samples += o.samples
    stats.succeeded = len(kept)
    accepted = [(o.cid, o.state) for o, _ in kept]
    if not kept:
        return algorithm.server_round(state, None, None), accepted
    ids = [o.cid for o, _ in kept]
    dtype = next(iter(state.params.values())).dtype
    samples = torch.tensor([data.clients[i].n for i in ids], dtype=dtype)
    weights = algorithm.aggregator.weights(ids, samples)
    stacked_aux = T.stack([a for _, a in kept]) if kept[0][1] else None
    state = algorithm.server_round(state, deltas, weights, stacked_aux, key=key)
    buffers.settle(state)
    return state, accepted


def _decode(algorithm, message: bytes, params) -> tuple[dict, dict]:
    """Decode one message; the loop runtime's ``decode_update`` where the screen doubts it."""
    parts = T.split(wire.loads(message))
    delta = algorithm.uplink.decode(parts.get("delta", {}))
    if set(delta) != set(params) or any(
            v.shape != params[k].shape or not v.is_floating_point() for k, v in delta.items()):
        return decode_update(algorithm, message, params)  # raises with the loop's reason
    return delta, parts.get("aux", {})


def _decode_all(algorithm, todo: list[Outcome], bufs: dict, params, failures: list) -> tuple[dict, list]:
    """The decoded deltas stacked ``(n, ...)`` and the kept ``(outcome, aux)``; a message that
    does not decode, or whose row sum is not finite and ``decode_update`` rejects, is dropped
    with the loop runtime's reason (a finite row sum proves every entry finite)."""
    rows, kept = [], []
    for i, o in enumerate(todo):
        try:
            delta, aux = _decode(algorithm, o.message, params)
        except ValueError as exc:
            failures.append((o.pos, o.cid, str(exc)))
            continue
        for k, buf in bufs.items():
            buf[i].copy_(delta[k])
        rows.append(i)
        kept.append((o, aux))
    idx = torch.tensor(rows, dtype=torch.long)
    if len(rows) < len(todo):
        bufs = {k: v[idx] for k, v in bufs.items()}
    if not kept:
        return bufs, kept
    ok = torch.ones(len(kept), dtype=torch.bool)
    for buf in bufs.values():
        ok &= torch.isfinite(buf.reshape(len(kept), -1).sum(1))
    if bool(ok.all()):
        return bufs, kept
    good = []
    for i in range(len(kept)):
        o = kept[i][0]
        try:
            if not ok[i]:
                decode_update(algorithm, o.message, params)
            good.append(i)
        except ValueError as exc:
            failures.append((o.pos, o.cid, str(exc)))
    idx = torch.tensor(good, dtype=torch.long)
    return {k: v[idx] for k, v in bufs.items()}, [kept[i] for i in good]
