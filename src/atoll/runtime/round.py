"""The round, written once: the client's half and the server's half.

Every runtime and scheduler runs a round with these functions and only decides who runs when
and where the bytes go:

* ``open_round``: the round's broadcast message (``broadcast_bytes``: the downlink codec with
  the round's key) and its byte count, per client where a tracker sends per-client deltas;
* ``client_round``: one client's answer to that message: decode the broadcast, draw its
  work, train, encode the uplink with the round's codec (``uplink_codec``), all its state in
  and out. The loop runtime runs it for each client, the vectorised and Ray runtimes for a
  chunk that raised (``one_by_one``; their fast path is checked against it), the asynchronous
  scheduler for groups on the loop path, and the deployed client with its own secret;
* ``close_round``: the server's half over a round's messages: count the bytes, drop
  stragglers when asked, decode and validate every message (``runtime.decode``, whose verdicts
  are ``runtime.check.decode_update``'s), then ``server_step`` (behind a secure sum:
  ``runtime.secure_round``, whose summand layout the deployed client and coordinator share);
* ``server_step``: weigh the kept updates, aggregate and step (``Algorithm.server_round``)
  with the round's server key. The asynchronous scheduler and the gRPC coordinator, which
  receive messages one at a time and validate each as it arrives, call it directly.

Privacy accounting and the budget check are one step of the run loop around the round
(``privacy.run.Driver``), shared by the synchronous and the asynchronous schedulers.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from atoll import rng
from atoll import tree as T
from atoll.runtime.base import Outcome, RoundStats, draw_work, uplink_codec
from atoll.runtime.decode import DecodeBuffers, decode_round
from atoll.runtime.downlink import downlink_bytes
from atoll.transport import wire

log = logging.getLogger("atoll")


def encode_aux(algorithm, aux: dict, up_key: int) -> dict:
    """The client's ``aux`` through the algorithm's stateless ``aux_codec`` (local DP's clip and
    noise), keyed from its uplink key."""
    if algorithm.aux_codec.plain or not aux:
        return aux
    codec = algorithm.aux_codec
    return codec.encode(aux, codec.init(aux), rng.fold(up_key, "aux"))[0]


def broadcast_bytes(algorithm, state, seed: int, r: int) -> bytes:
    """Round ``r``'s downlink message, serialised once."""
    payload, _ = algorithm.downlink.encode(
        T.join(algorithm.broadcast(state)), (), rng.key(seed, r, rng.SERVER, "downlink"))
    return wire.dumps(payload)


def copies_bytes(algorithm, state, cohort: list[int], seed: int, copy) -> dict[int, bytes]:
    """Each cohort client's own broadcast: the state with ``copy(params, cid)`` as its model."""
    r = state.round + 1
    return {c: broadcast_bytes(algorithm, replace(state, params=copy(state.params, c)), seed, r)
            for c in cohort}


def received(down, cid: int) -> bytes:
    """What client ``cid`` receives of ``open_round``'s downlink: the shared broadcast, or its
    own copy (``Algorithm.client_copy``: a dict by client)."""
    return down[cid] if isinstance(down, dict) else down


def open_round(algorithm, state, cohort: list[int], seed: int):
    """``(round, stats with the downlink bytes, broadcast bytes, state)``; the state changes
    only where a tracker records what each client received. With ``Algorithm.client_copy`` the
    broadcast is a dict of each client's own bytes (runtimes that declare ``client_copies``)."""
    r = state.round + 1
    stats = RoundStats(sampled=len(cohort))
    if algorithm.client_copy is not None:
        down = copies_bytes(algorithm, state, cohort, seed, algorithm.client_copy)
        stats.bytes_down = sum(map(len, down.values()))
        return r, stats, down, state
    down = broadcast_bytes(algorithm, state, seed, r)
    sizes, anchor, state = downlink_bytes(algorithm, state, cohort, down)
    stats.bytes_down = sum(sizes) + anchor
    return r, stats, down, state


def client_round(algorithm, client_update, down_bytes: bytes, cstate, cdata, cid: int, r: int,
                 work, seed: int, secret: bytes | None = None):
    """One client's answer: ``(message, new client state, metrics, straggler)``. ``secret``:
    the deployed client's (``rng.private_key``); its training and uplink keys, which draw its
    privacy noise, then come from it."""
    received = T.split(algorithm.downlink.decode(wire.loads(down_bytes)))
    params = received["params"]
    if cstate is None:
        cstate = algorithm.new_client_state(params)
    batches, step_mask, straggler = draw_work(algorithm.draw, cdata, cid, r, seed, work, params, secret)
    key = rng.private_key(seed, r, cid, "client", secret)
    with rng.torch_seeded(key):  # dropout and other draws in training: the client's own
        result = client_update(params, cstate, received, batches, step_mask, key)
    up_key = rng.private_key(seed, r, cid, "uplink", secret)
    payload, up_state = uplink_codec(algorithm, seed, r).encode(result.delta, cstate["uplink"], up_key)
    message = wire.dumps(T.join({"delta": payload, "aux": encode_aux(algorithm, result.aux, up_key)}))
    return message, {**result.client_state, "uplink": up_state}, result.metrics, straggler


def one_by_one(algorithm, client_update, down_bytes, chunk, cstates, data, work, seed, r,
               client=client_round) -> list[Outcome]:
    """``client`` (``client_round``) for each client of ``chunk`` (``work.ClientPlan``s); a
    client that raises becomes an ``Outcome`` with the reason, and the others go on."""
    out = []
    for p, cstate in zip(chunk, cstates):
        try:
            message, new, metrics, straggler = client(algorithm, client_update, received(down_bytes, p.cid),
                                                      cstate, data.clients[p.cid], p.cid, r, work, seed)
        except Exception as exc:  # a failing client must not stop the round
            out.append(Outcome(p.pos, p.cid, None, None, 0.0, 0.0, p.straggler,
                               f"client raised {type(exc).__name__}: {exc}"))
            continue
        out.append(Outcome(p.pos, p.cid, message, new, float(metrics["loss"]),
                           float(metrics["samples"]), straggler))
    return out


def close_round(algorithm, state, outcomes: list[Outcome], data, work, stats: RoundStats,
                seed: int, buffers: DecodeBuffers | None = None):
    """The server's half over a round's ``outcomes``: ``(state, accepted)``, where ``accepted``
    lists ``(cid, new client state)``.

    Clients are aggregated in the order given (the order their messages were written, so that
    rows of one buffer are read in place), which changes the aggregate only by rounding;
    failures are reported in cohort order with ``decode_update``'s reasons."""
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
    deltas, aux, kept = decode_round(algorithm, todo, buffers, state.params, failures)
    for _, cid, why in sorted(failures):
        stats.failures.append((cid, why))
        log.warning("round %d: client %d dropped: %s", r, cid, why)
    for o in kept:
        stats.loss_sum += o.loss * o.samples
        stats.samples += o.samples
    stats.succeeded = len(kept)
    ids = [o.cid for o in kept]
    if algorithm.secure is not None and kept:
        from atoll.runtime.secure_round import secure_round

        return secure_round(algorithm, state, kept, deltas, aux, data, stats, seed), \
            [(o.cid, o.state) for o in kept]
    state = server_step(algorithm, state, ids, deltas if kept else None,
                        [data.clients[i].n for i in ids], aux, seed)
    buffers.settle(state)
    return state, [(o.cid, o.state) for o in kept]


def server_step(algorithm, state, ids: list[int], deltas, samples: list, aux, seed: int,
                weights: torch.Tensor | None = None):
    """Weigh, aggregate and step on the kept updates of one round (``ids`` empty: nobody).

    ``deltas`` / ``aux``: stacked trees ``(n, ...)`` or lists of per-client trees (``aux``
    None or empty: no aux); ``weights``: the aggregator's from ``samples`` unless given (FedBuff
    weighs its buffer ``1/K``). The server key is the round's, the same in every runtime."""
    if not ids:
        return algorithm.server_round(state, None, None)
    if isinstance(deltas, list):
        deltas = T.stack(deltas)
    if isinstance(aux, list):
        aux = T.stack(aux) if aux and aux[0] else None
    if weights is None:
        dtype = next(iter(state.params.values())).dtype
        weights = algorithm.aggregator.weights(ids, torch.tensor(samples, dtype=dtype))
    key = rng.key(seed, state.round + 1, rng.SERVER, "server")
    return algorithm.server_round(state, deltas, weights, aux or None, key=key, ids=ids)
