"""``VmapRuntime``: the clients of a round train together under ``torch.func.vmap``.

Each client's batches come from the same ``client_work`` (same keys) as in ``LoopRuntime``;
they are padded to ``(C, S, B, ...)`` with the step mask false on padded steps, so clients with
different data sizes and step counts share one chunk. The one pure ``ClientUpdate`` runs under
``vmap`` with the broadcast model unbatched: the first local step of every client is then one
shared product instead of C small ones. Cohorts are cut into chunks that fit a memory budget.

Uplink messages are still real ``wire`` bytes per client (encoded from a slice of the stacked
delta), validated by the same ``decode_update`` as the loop runtime: results, metrics and byte
counts equal ``LoopRuntime``'s (checked to 1e-9 in float64 in ``tests/runtime``).
"""
from __future__ import annotations

import logging

import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

from atoll import rng
from atoll import tree as T
from atoll.algorithm import Algorithm
from atoll.runtime import fused as fast
from atoll.runtime.base import LocalWork, RoundStats, client_work
from atoll.runtime.loop import decode_update
from atoll.transport import wire
from atoll.types import ServerState

log = logging.getLogger("atoll")


class VmapRuntime:
    """Vectorised clients. ``threads``: torch intra-op threads (default: all cores, because
    the fused per-round products are large enough to use both); set once, logged once."""

    name = "vmap"

    def __init__(self, device: str = "cpu", memory_budget_mb: float = 1024, threads: int | None = None,
                 fused: bool = True):
        self.fused = fused
        self.device = torch.device(device)
        self.budget = memory_budget_mb * 2**20
        self.threads = threads or torch.get_num_threads()
        self._announced = False

    def run_round(self, algorithm: Algorithm, client_update, state: ServerState,
                  client_states: dict, cohort: list[int], data, work: LocalWork, seed: int):
        self._announce()
        r = state.round + 1
        stats = RoundStats(sampled=len(cohort))
        down_payload, _ = algorithm.downlink.encode(
            T.join(algorithm.broadcast(state)), (), rng.key(seed, r, rng.SERVER, "downlink"))
        down_bytes = wire.dumps(down_payload)
        stats.bytes_down = len(down_bytes) * len(cohort)
        received = T.split(algorithm.downlink.decode(wire.loads(down_bytes)))
        received = {g: {k: v.to(self.device) for k, v in t.items()} for g, t in received.items()}
        batched = self._engine(client_update)
        accepted, new_states = [], dict(client_states)
        for chunk in self._chunks(cohort, data, work, state.params):
            accepted += self._run_chunk(batched, algorithm, received, client_states, new_states,
                                        chunk, data, work, seed, r, state.params, stats)
        stats.succeeded = len(accepted)
        if not accepted:
            return algorithm.server_round(state, None, None), new_states, stats
        ids = [a[0] for a in accepted]
        samples = torch.tensor([float(data.clients[i].n) for i in ids], dtype=_dtype(state.params))
        weights = algorithm.aggregator.weights(ids, samples)
        aux = [a[2] for a in accepted]
        stacked_aux = T.stack(aux) if aux[0] else None
        state = algorithm.server_round(state, T.stack([a[1] for a in accepted]), weights, stacked_aux)
        return state, new_states, stats

    def _engine(self, client_update):
        """The fused path when the client update is plain ``local_training`` of a supported
        model (it keeps no client state and sends no aux), else vmap of the update itself."""
        loss_fn, transform = getattr(client_update, "parts", (None, None))
        layers = fast.layers_of(getattr(loss_fn, "model", None)) if self.fused else None
        if layers is not None:
            def run(params, cstates, received, batches, step_mask, keys):
                delta, metrics = fast.local_training(layers, transform, params, batches, step_mask)
                return delta, {}, cstates, metrics
            return run
        return vmap(_as_tuple(client_update), in_dims=(None, 0, None, 0, 0, 0), randomness="different")

    def _run_chunk(self, batched, algorithm, received, client_states, new_states, chunk, data,
                   work, seed, r, params, stats) -> list:
        works = [client_work(data.clients[c].x, data.clients[c].y, c, r, seed, work) for c in chunk]
        batches, step_mask = _pad([w[0] for w in works], [w[1] for w in works], self.device)
        cstates = [client_states.get(c) or {"uplink": algorithm.uplink.init(params)} for c in chunk]
        keys = torch.tensor([rng.key(seed, r, c, "client") for c in chunk])
        delta, aux, new_cs, metrics = batched(received["params"], _stack(cstates), received,
                                              batches, step_mask, keys)
        out = []
        for i, cid in enumerate(chunk):
            one = {k: v[i].cpu() for k, v in delta.items()}
            cs = tree_map(lambda v, i=i: v[i], new_cs)
            payload, up_state = algorithm.uplink.encode(one, cs["uplink"], rng.key(seed, r, cid, "uplink"))
            message = wire.dumps(T.join({"delta": payload, "aux": {k: v[i].cpu() for k, v in aux.items()}}))
            stats.bytes_up += len(message)
            if works[i][2] and work.drop_stragglers:
                stats.stragglers_dropped += 1
                continue
            try:
                d, extra = decode_update(algorithm, message, params)
            except ValueError as exc:
                stats.failures.append((cid, str(exc)))
                log.warning("round %d: client %d update rejected: %s", r, cid, exc)
                continue
            new_states[cid] = {**cs, "uplink": up_state}
            stats.loss_sum += float(metrics["loss"][i]) * float(metrics["samples"][i])
            stats.samples += float(metrics["samples"][i])
            out.append((cid, d, extra))
        return out

    def _chunks(self, cohort, data, work, params):
        """Cut the cohort so that one chunk's batches, parameters, gradients and optimizer
        state (about 6 model copies per client) stay within the memory budget."""
        model_bytes = sum(v.numel() * v.element_size() for v in params.values())
        per_client = []
        for c in cohort:
            x = data.clients[c].x
            per_client.append(6 * model_bytes + work.total_steps(x.shape[0]) * work.batch_size
                              * x[:1].numel() * x.element_size())
        chunk, used = [], 0
        for c, cost in zip(cohort, per_client):
            if chunk and used + cost > self.budget:
                yield chunk
                chunk, used = [], 0
            chunk.append(c)
            used += cost
        if chunk:
            yield chunk

    def _announce(self):
        if not self._announced:
            torch.set_num_threads(self.threads)
            log.info("VmapRuntime: device=%s, %d torch threads, memory budget %.0f MB",
                     self.device, self.threads, self.budget / 2**20)
            self._announced = True


def _as_tuple(client_update):
    def fn(params, cstate, received, batches, step_mask, key):
        res = client_update(params, cstate, received, batches, step_mask, key)
        return res.delta, res.aux, res.client_state, res.metrics
    return fn


def _pad(batches: list[dict], masks: list[torch.Tensor], device) -> tuple[dict, torch.Tensor]:
    """Stack per-client ``(S_i, B, ...)`` batches into ``(C, S, B, ...)``, S = max S_i."""
    s = max(m.shape[0] for m in masks)
    out = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            t = b[key]
            pad = torch.zeros((s - t.shape[0], *t.shape[1:]), dtype=t.dtype)
            parts.append(torch.cat([t, pad]))
        out[key] = torch.stack(parts).to(device)
    step = torch.stack([torch.cat([m, torch.zeros(s - m.shape[0], dtype=torch.bool)]) for m in masks])
    return out, step.to(device)


def _stack(states: list):
    leaves = [tree_map(lambda v: v, s) for s in states]
    return tree_map(lambda *xs: torch.stack(xs), *leaves) if leaves else ()


def _dtype(params):
    return next(iter(params.values())).dtype
