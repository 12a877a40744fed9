"""The server reading a round's messages: decode, screen and stack them, reusing buffers.

``decode_round(algorithm, todo, buffers, params, failures)`` turns the messages of a round into
one stacked tensor per entry. With the identity uplink every message of a round has one
structure, so they are read with one ``wire.Layout.stack`` (in place when they are still equally
spaced rows of one buffer); otherwise message by message. A cheap screen (entries, shapes,
floating dtype, finite row sums) passes the normal message, and any message it doubts gets
``runtime.check.decode_update`` for the verdict and the reason, so every runtime rejects
exactly what the reference validator rejects, with its words.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from atoll import tree as T
from atoll.runtime.check import decode_update
from atoll.transport import wire

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


def _decode(algorithm, message: bytes, params) -> tuple[dict, dict]:
    """Decode one message; the loop runtime's ``decode_update`` where the screen doubts it."""
    parts = T.split(wire.loads(message))
    delta = algorithm.uplink.decode(parts.get("delta", {}))
    if set(delta) != set(params) or any(
            v.shape != params[k].shape or not v.is_floating_point() for k, v in delta.items()):
        return decode_update(algorithm, message, params)  # raises with the loop's reason
    return delta, algorithm.aux_codec.decode(parts.get("aux", {}))


def _stack(algorithm, todo: list[Outcome], params, buffers: DecodeBuffers):
    """``(deltas, aux or None)`` stacked ``(n, ...)`` from one ``Layout.stack`` of all messages,
    where that is what the loop runtime decodes: identity uplink, every message of the first
    one's layout, whose entries are the model's (floating, same shapes) plus ``aux/...``.
    None where anything differs (the per-message path then decides, with its reasons)."""
    if not todo or not (algorithm.uplink.plain and algorithm.aux_codec.plain):
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


def decode_round(algorithm, todo: list[Outcome], buffers: DecodeBuffers, params,
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
