"""The client half after training and the server half of a round, shared by the fast runtimes.

``encode_chunk`` turns a chunk's stacked results into one real ``wire`` message per client
(the uplink codec runs on the client's slice of the stacked delta with the client's own key);
``finish_round`` then does exactly what ``LoopRuntime.run_round`` does with its messages, in
cohort order: count the bytes, drop stragglers when asked, validate with ``decode_update``
(same rejection reasons), aggregate the accepted deltas and step the server. So byte counts,
failures, client states and the aggregated update equal the loop runtime's.

Identity uplink (``is_identity``: the codec sends the delta as it is, and keeps no state):
every message of a round has one structure, so the messages are rows of one ``wire.Rows``
buffer (an engine may write its deltas straight into them), and the server reads them back
with ``wire.Layout.stack``: in place when they are still equally spaced rows of one buffer.
The bytes are those ``wire.dumps`` writes, and a message is decoded this way only when its
header and length are exactly the layout's (``Layout.matches``); anything else takes the
per-message path.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from atoll import rng
from atoll import tree as T
from atoll.codecs import identity
from atoll.runtime.base import RoundStats
from atoll.runtime.loop import LoopRuntime, decode_update, uplink_codec
from atoll.transport import wire

log = logging.getLogger("atoll")


@dataclass(slots=True)
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
            payload, up = codec.encode(per_client[i], uplink_states[i],
                                       rng.key(seed, r, p.cid, "uplink"))
            aux = {k: v[i] for k, v in result.aux.items()}
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


_IDENTITY = identity()


def is_identity(codec) -> bool:
    """Whether ``codec`` is ``codecs.identity()`` (by code: a codec shipped to a Ray worker by
    cloudpickle has equal, not identical, code objects)."""
    return (getattr(codec.encode, "__code__", None) == _IDENTITY.encode.__code__
            and getattr(codec.decode, "__code__", None) == _IDENTITY.decode.__code__
            and getattr(codec.init, "__code__", None) == _IDENTITY.init.__code__)


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
    """The stacked decode buffers, reused from round to round.

    Allocating ~100 model copies afresh every round page-faults them in again (on this machine
    that was 40,000 faults, ~12 ms, per round of workload B; even with ``host.tune_allocator``
    a fresh 22 MB message buffer was faulted in again every few rounds of workload C, 60 ms
    each time). Invariant: a buffer is reused only while nothing the server returned
    (``ServerState``) shares its memory; ``settle`` checks that after every round and
    otherwise lets the buffer go to its new owner."""

    def __init__(self):
        self._bufs: dict = {}

    def take(self, params, n: int) -> dict:
        """``(n, *shape)`` buffers like ``params`` (the per-message path)."""
        out = {}
        for k, p in params.items():
            buf = self._bufs.get(k)
            if buf is None or buf.shape[0] < n or buf.shape[1:] != p.shape or buf.dtype != p.dtype:
                buf = self._bufs[k] = p.new_empty((n, *p.shape))
            out[k] = buf[:n]
        return out

    def raw(self, nbytes: int, key: str = "stack") -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes``: ``"stack"`` for ``wire.Layout.stack`` to copy
        messages into, ``"rows"`` for the round's uplink messages (``wire.Rows``)."""
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    def settle(self, state) -> None:
        held = {t.untyped_storage().data_ptr() for t in tree_flatten(
            (state.params, state.opt_state, state.extra))[0] if isinstance(t, torch.Tensor)}
        if any(b.untyped_storage().data_ptr() in held for b in self._bufs.values()):
            self._bufs = {}


def finish_round(algorithm, state, outcomes: list[Outcome], data, work, stats: RoundStats,
                 buffers: DecodeBuffers | None = None, key: int = 0):
    """Validate and aggregate ``outcomes`` as ``LoopRuntime`` does.

    Clients are aggregated in the order given (the order their messages were written, so that
    rows of one buffer are read in place), which changes the aggregate only by rounding;
    failures are reported in cohort order. The messages are decoded from their bytes into one
    stacked tensor per entry (``_stack``, or message by message); a cheap screen (entries,
    shapes, floating dtype, finite row sums)
    passes the normal message, and any message it doubts gets the loop runtime's
    ``decode_update`` for the verdict and the reason. Returns ``(state, accepted)``, where
    ``accepted`` lists ``(cid, new client state)``.
    """
    r = state.round + 1
    failures, todo = [], []
    for o in outcomes:
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
    deltas, stacked_aux, kept = _decode_all(algorithm, todo, buffers, state.params, failures)
    for _, cid, why in sorted(failures):
        stats.failures.append((cid, why))
        log.warning("round %d: client %d dropped: %s", r, cid, why)
    for o in kept:
        stats.loss_sum += o.loss * o.samples
        stats.samples += o.samples
    stats.succeeded = len(kept)
    accepted = [(o.cid, o.state) for o in kept]
    if not kept:
        return algorithm.server_round(state, None, None), accepted
    ids = [o.cid for o in kept]
    dtype = next(iter(state.params.values())).dtype
    samples = torch.tensor([data.clients[i].n for i in ids], dtype=dtype)
    weights = algorithm.aggregator.weights(ids, samples)
    state = algorithm.server_round(state, deltas, weights, stacked_aux, key=key, ids=ids)
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


def _stack(algorithm, todo: list[Outcome], params, buffers: DecodeBuffers):
    """``(deltas, aux or None)`` stacked ``(n, ...)`` from one ``Layout.stack`` of all messages,
    where that is what the loop runtime decodes: identity uplink, every message of the first
    one's layout, whose entries are the model's (floating, same shapes) plus ``aux/...``.
    None where anything differs (the per-message path then decides, with its reasons)."""
    if not todo or not is_identity(algorithm.uplink):
        return None
    try:
        layout = wire.Layout.parse(todo[0].message)
    except wire.WireError:
        return None
    wanted = {f"delta/{k}" for k in params}
    if not wanted <= set(layout.entries) or any(
            not n.startswith("aux/") for n in set(layout.entries) - wanted):
        return None
    for k, p in params.items():
        dtype, shape, _, _ = layout.entries[f"delta/{k}"]
        if shape != tuple(p.shape) or not dtype.is_floating_point:
            return None
    messages = [o.message for o in todo]
    try:  # every message must match the layout, else the per-message path decides
        stacked = layout.stack(messages, buffers.raw(len(messages) * layout.stride + wire.ALIGN))
    except wire.WireError:
        return None
    parts = T.split(stacked)
    deltas = {k: parts["delta"][k].to(p.dtype) for k, p in params.items()}
    return deltas, parts.get("aux") or None


def _decode_all(algorithm, todo: list[Outcome], buffers: DecodeBuffers, params,
                failures: list) -> tuple[dict, dict | None, list]:
    """The decoded deltas and aux stacked ``(n, ...)`` and the kept outcomes; a message that
    does not decode, or whose row sum is not finite and ``decode_update`` rejects, is dropped
    with the loop runtime's reason (a finite row sum proves every entry finite)."""
    fast = _stack(algorithm, todo, params, buffers)
    if fast is not None:
        (deltas, aux), kept = fast, list(todo)
    else:
        deltas, aux, kept = _decode_each(algorithm, todo, buffers.take(params, len(todo)), params,
                                         failures)
    if not kept:
        return deltas, aux, kept
    ok = torch.ones(len(kept), dtype=torch.bool)
    for v in deltas.values():
        ok &= torch.isfinite(v.reshape(len(kept), -1).sum(1))
    if bool(ok.all()):
        return deltas, aux, kept
    good = []
    for i, o in enumerate(kept):
        try:
            if not ok[i]:
                decode_update(algorithm, o.message, params)
            good.append(i)
        except ValueError as exc:
            failures.append((o.pos, o.cid, str(exc)))
    idx = torch.tensor(good, dtype=torch.long)
    pick = lambda tree: {k: v[idx] for k, v in tree.items()}  # noqa: E731
    return pick(deltas), (pick(aux) if aux else None), [kept[i] for i in good]


def _decode_each(algorithm, todo: list[Outcome], bufs: dict, params, failures: list):
    """The per-message path: decode, screen and copy each message into ``bufs``."""
    rows, kept, auxes = [], [], []
    for i, o in enumerate(todo):
        try:
            delta, aux = _decode(algorithm, o.message, params)
        except ValueError as exc:
            failures.append((o.pos, o.cid, str(exc)))
            continue
        for k, buf in bufs.items():
            buf[i].copy_(delta[k])
        rows.append(i)
        kept.append(o)
        auxes.append(aux)
    if len(rows) < len(todo):
        idx = torch.tensor(rows, dtype=torch.long)
        bufs = {k: v[idx] for k, v in bufs.items()}
    return bufs, (T.stack(auxes) if auxes and auxes[0] else None), kept
