"""``LoopRuntime``: the reference runtime, one client after another.

Every broadcast and every update goes through ``transport.wire`` bytes, so the byte counts are
those of real messages. A client that raises, or whose update fails ``runtime.check.decode_update``
(does not decode, wrong entries or shapes, not finite, unexpected aux), is dropped from the
round with a logged reason; the others go on.
"""
from __future__ import annotations

import logging

import torch

from atoll import rng
from atoll import tree as T
from atoll.algorithm import Algorithm
from atoll.codecs import Codec, for_round
from atoll.runtime.check import decode_update
from atoll.runtime.downlink import downlink_bytes
from atoll.runtime.base import LocalWork, RoundStats, draw_work
from atoll.transport import wire
from atoll.types import ServerState

log = logging.getLogger("atoll")


class LoopRuntime:
    name = "loop"

    def run_round(self, algorithm: Algorithm, client_update, state: ServerState,
                  client_states: dict, cohort: list[int], data, work: LocalWork, seed: int):
        """One synchronous round over ``cohort``. Returns (state, client_states, stats)."""
        r = state.round + 1
        stats = RoundStats(sampled=len(cohort))
        down_payload, _ = algorithm.downlink.encode(
            T.join(algorithm.broadcast(state)), (), rng.key(seed, r, rng.SERVER, "downlink"))
        down_bytes = wire.dumps(down_payload)
        sizes, anchor, state = downlink_bytes(algorithm, state, cohort, down_bytes)
        stats.bytes_down = sum(sizes) + anchor
        ids, deltas, aux, samples = [], [], [], []
        new_states = dict(client_states)
        for cid in cohort:
            try:
                message, cstate, metrics, straggler = self._client(
                    algorithm, client_update, down_bytes, client_states.get(cid), data.clients[cid],
                    cid, r, work, seed)
            except Exception as exc:  # a failing client must not stop the round
                stats.failures.append((cid, f"client raised {type(exc).__name__}: {exc}"))
                log.warning("round %d: client %d dropped: %s", r, cid, exc)
                continue
            stats.bytes_up += len(message)
            stats.up_bytes[cid] = len(message)
            if straggler and work.drop_stragglers:
                stats.stragglers_dropped += 1
                continue
            try:
                delta, extra = decode_update(algorithm, message, state.params)
            except ValueError as exc:
                stats.failures.append((cid, str(exc)))
                log.warning("round %d: client %d update rejected: %s", r, cid, exc)
                continue
            new_states[cid] = cstate
            ids.append(cid)
            deltas.append(delta)
            aux.append(extra)
            samples.append(data.clients[cid].n)
            stats.loss_sum += float(metrics["loss"]) * float(metrics["samples"])
            stats.samples += float(metrics["samples"])
        stats.succeeded = len(ids)
        if not ids:
            return algorithm.server_round(state, None, None), new_states, stats
        dtype = next(iter(state.params.values())).dtype
        weights = algorithm.aggregator.weights(ids, torch.tensor(samples, dtype=dtype))
        stacked_aux = T.stack(aux) if aux[0] else None
        state = algorithm.server_round(state, T.stack(deltas), weights, stacked_aux,
                                       key=rng.key(seed, r, rng.SERVER, "server"), ids=ids)
        return state, new_states, stats

    @staticmethod
    def _client(algorithm, client_update, down_bytes, cstate, cdata, cid, r, work, seed,
                secret: bytes | None = None):
        """One client's answer. ``secret``: the deployed client's (``rng.private_key``); its
        training and uplink keys, which draw its privacy noise, then come from it."""
        received = T.split(algorithm.downlink.decode(wire.loads(down_bytes)))
        params = received["params"]
        if cstate is None:
            cstate = algorithm.new_client_state(params)
        batches, step_mask, straggler = draw_work(client_update, cdata, cid, r, seed, work, params,
                                                  secret)
        key = rng.private_key(seed, r, cid, "client", secret)
        with rng.torch_seeded(key):  # dropout and other draws in training: the client's own
            result = client_update(params, cstate, received, batches, step_mask, key)
        payload, up_state = uplink_codec(algorithm, seed, r).encode(
            result.delta, cstate["uplink"], rng.private_key(seed, r, cid, "uplink", secret))
        message = wire.dumps(T.join({"delta": payload, "aux": result.aux}))
        return message, {**result.client_state, "uplink": up_state}, result.metrics, straggler


def uplink_codec(algorithm: Algorithm, seed: int, r: int) -> Codec:
    """Round ``r``'s uplink codec: randomness all its clients share (count-sketch hashes) drawn
    from the round's key, the same for every client and runtime."""
    return for_round(algorithm.uplink, rng.key(seed, r, rng.SERVER, "uplink"))
