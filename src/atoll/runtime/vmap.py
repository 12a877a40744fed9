"""``VmapRuntime``: the clients of a round train together, chunk by chunk.

A round: the broadcast is encoded and serialised once (every client receives the same bytes;
``bytes_down`` counts one message per sampled client), each client's batches and step mask are
drawn by ``client_work`` with the loop runtime's keys, the cohort is cut into chunks, and each
chunk is padded to ``(C, S, B, ...)`` and trained by one engine call (``engine.py``: the pure
``ClientUpdate`` under ``torch.func.vmap``, or the fused MLP/SGD path where it applies). Each
client's row of the stacked delta is then encoded by the uplink codec and serialised to its
own ``wire`` message, and the server half is the loop runtime's (``round.close_round``).
With the identity uplink the round's messages are rows of one buffer (``wire.Rows``) that the
fused engine trains in and the server reads in place: one message per client, no copies.

Invariant: same parameters, metrics, byte counts, failures and client states as
``LoopRuntime`` (float64: 1e-9; ``tests/runtime``). A chunk that raises is re-run client by
client on the loop path, so a failing client is dropped with the loop runtime's reason.

Threads: ``threads=None`` uses every core this process may run on
(``os.sched_getaffinity``) as torch intra-op threads, set once when the first round starts and
logged: the per-step products of a chunk span all cores and nothing else computes meanwhile,
so the cores are neither idle nor oversubscribed. Chunks on the CPU are sized so that the
chunk's stacked weights stay in cache (``cache_bytes``), within ``memory_budget_bytes``.
"""
from __future__ import annotations

import logging

import torch
from torch.utils._pytree import tree_flatten, tree_map

from atoll import rng
from atoll.client import as_update
from atoll import tree as T
from atoll.runtime.base import LocalWork, draw_work, stack_drawn
from atoll.runtime.decode import DecodeBuffers
from atoll.runtime.engine import PerClient, VmapEngine
from atoll.runtime.fused import FusedMLP, match
from atoll.runtime.host import freeze_heap, tune_allocator, usable_cores
from atoll.runtime.store import ClientStore
from atoll.runtime.round import close_round, one_by_one, open_round
from atoll.runtime.uplink import encode_chunk, split_state
from atoll.runtime.work import chunk_batches, cut_chunks, plan_clients
from atoll.transport import wire

log = logging.getLogger("atoll")


def select_engine(client_update, fused: bool = True):
    """The fused engine where it applies to ``client_update``, else :class:`VmapEngine`;
    :class:`PerClient` for an update that draws random numbers."""
    if as_update(client_update).random:
        return PerClient(client_update)
    if fused:
        spec = match(client_update)
        if spec is not None:
            return FusedMLP(spec)
    return VmapEngine(client_update)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device = {device!r}, but no CUDA device is available "
                         "(use \"auto\" or \"cpu\")")
    return dev


class VmapRuntime:
    name = "vmap"

    def __init__(self, device: str = "cpu", memory_budget_bytes: int = 2**30,
                 threads: int | None = None, fused: bool = True, chunk_clients: int | None = None,
                 cache_bytes: int = 8 * 2**20, tune_process: bool = True):
        if threads is not None and threads < 1:
            raise ValueError(f"runtime.threads must be >= 1, got {threads}")
        self.device = resolve_device(device)
        self.budget = int(memory_budget_bytes)
        self.threads = threads or usable_cores()
        self.fused, self.chunk_clients, self.cache_bytes = fused, chunk_clients, cache_bytes
        self.tune_process = tune_process
        self._engine = (None, None)
        self._started = False
        self._buffers = DecodeBuffers()

    def describe(self) -> str:
        return (f"VmapRuntime: device {self.device}, {self.threads} torch thread(s) "
                f"(one per usable core, set once), memory budget {self.budget / 2**20:.0f} MiB")

    def start(self) -> None:
        """Set the thread count once and say so (idempotent)."""
        if not self._started:
            torch.set_num_threads(self.threads)
            process = (f"{tune_allocator()}; {freeze_heap()}" if self.tune_process
                       else "allocator and garbage collector unchanged")
            log.info("%s; %s", self.describe(), process)
            self._started = True

    def run_round(self, algorithm, client_update, state, client_states, cohort: list[int], data,
                  work: LocalWork, seed: int):
        """One synchronous round over ``cohort``. Returns (state, client_states, stats)."""
        self.start()
        r, stats, down_bytes, state, client_states, cstates = begin_round(
            algorithm, state, client_states, cohort, data, seed)
        outcomes = self.train(algorithm, client_update, down_bytes, cstates, cohort, data, work, seed, r)
        return end_round(algorithm, state, client_states, outcomes, data, work, stats,
                         self._buffers, seed, r)

    def train(self, algorithm, client_update, down_bytes: bytes, cstates: list, cohort: list[int],
              data, work: LocalWork, seed: int, r: int) -> list:
        """Train and encode ``cohort`` (the client half of a round); a list of ``Outcome``.
        ``cstates[i]`` is the state of ``cohort[i]`` or None. The messages may be rows of a
        buffer this runtime reuses: they are valid until its next round."""
        received = T.split(algorithm.downlink.decode(wire.loads(down_bytes)))
        on_dev = {g: {k: v.to(self.device) for k, v in t.items()} for g, t in received.items()}
        cstates = [s if s is not None else algorithm.new_client_state(received["params"])
                   for s in cstates]
        plans = plan_clients(cohort, data, r, seed, work)
        engine = self.engine(client_update)
        if isinstance(engine, PerClient):
            return one_by_one(algorithm, client_update, down_bytes, plans, cstates, data, work, seed, r)
        size = self.chunk_size(engine, on_dev["params"], plans, data, work.batch_size)
        rows = self.uplink_rows(algorithm, received["params"], len(cohort))
        outcomes, start = [], 0
        for chunk in cut_chunks(plans, size):
            states = [cstates[p.pos] for p in chunk]
            try:
                outcomes += self._run_chunk(engine, algorithm, on_dev, chunk, states, data, work,
                                            seed, r, rows, start)
            except Exception as exc:  # find the failing clients on the loop path
                log.info("round %d: chunk of %d clients raised %s; running it client by client",
                         r, len(chunk), exc)
                outcomes += one_by_one(algorithm, client_update, down_bytes, chunk, states, data,
                                       work, seed, r)
            start += len(chunk)
        return outcomes

    def uplink_rows(self, algorithm, params, n: int) -> wire.Rows | None:
        """With the identity uplink, the round's ``n`` messages as rows of one buffer, laid out
        as a message of a delta like ``params`` and no aux (``encode_chunk`` falls back to one
        ``dumps`` per client for a chunk whose results have another layout)."""
        if not (algorithm.uplink.plain and algorithm.aux_codec.plain):
            return None
        layout = wire.Layout.of(T.join({"delta": params, "aux": {}}))
        return layout.rows(n, self._buffers.raw(n * layout.stride + wire.ALIGN, "rows"))

    def _run_chunk(self, engine, algorithm, received, chunk, states, data, work, seed, r,
                   rows=None, start=0):
        ups, rests = zip(*(split_state(s) for s in states))
        if algorithm.draw is not None:  # the algorithm draws its own (DP-SGD, ...)
            batches, step_mask = drawn_batches(algorithm.draw, chunk, data, work, seed, r,
                                               received["params"], self.device)
        else:
            batches, step_mask = chunk_batches(chunk, data.clients, work.batch_size, self.device)
        keys = lambda: torch.tensor([rng.key(seed, r, p.cid, "client") for p in chunk],  # noqa: E731
                                    device=self.device)  # the fused engine never needs them
        rest = (tree_map(lambda *xs: torch.stack(xs).to(self.device), *rests)
                if any(rests) else {})
        out = None  # on the CPU the engine may write the deltas straight into the messages
        if rows is not None and self.device.type == "cpu":
            views = {k: rows.views.get(f"delta/{k}") for k in received["params"]}
            if all(v is not None for v in views.values()):
                out = {k: v[start:start + len(chunk)] for k, v in views.items()}
        result = engine.run(received["params"], rest, received, batches, step_mask, keys, out=out)
        return encode_chunk(algorithm, chunk, result, list(ups), seed, r, rows, start)

    def engine(self, client_update):
        """The chunk engine for ``client_update`` (built once per update function)."""
        if self._engine[0] is not client_update:
            self._engine = (client_update, select_engine(client_update, self.fused))
            log.info("VmapRuntime: %s engine%s", self._engine[1].name,
                     f" ({self._engine[1].reason})" if isinstance(self._engine[1], PerClient) else "")
        return self._engine[1]

    def chunk_size(self, engine, params, plans, data, width: int) -> int:
        """Clients per chunk: the memory budget over a client's working set (model copies plus
        its padded batches); on the CPU also at most ``cache_bytes`` of stacked weights."""
        model = sum(v.numel() * v.element_size() for v in params.values())
        x = data.clients[plans[0].cid].x if plans else None
        sample = x[:1].numel() * x.element_size() if x is not None else 0
        steps = max((p.steps for p in plans), default=0)
        copies = 8 if isinstance(engine, VmapEngine) else 3
        per_client = copies * model + steps * width * sample
        size = max(1, self.budget // max(per_client, 1))
        if self.chunk_clients is not None:
            size = min(size, self.chunk_clients)
        elif self.device.type == "cpu" and max((p.active for p in plans), default=0) > 1:
            # weights reused from step to step should stay in cache; one step reuses nothing
            size = min(size, max(1, self.cache_bytes // max(model, 1)))
        return size


def begin_round(algorithm, state, client_states, cohort: list[int], data, seed: int):
    """``round.open_round``, and the cohort's states from the client-state store:
    ``(round, stats, broadcast bytes, state, client-state store, the cohort's states)``."""
    r, stats, down_bytes, state = open_round(algorithm, state, cohort, seed)
    client_states = store_for(algorithm, state, client_states, len(data.clients))
    return r, stats, down_bytes, state, client_states, load_states(client_states, cohort)


def end_round(algorithm, state, client_states, outcomes: list, data, work, stats, buffers,
              seed: int, r: int):
    """``round.close_round``, and the accepted clients' states stored: ``(state,
    client_states, stats)``."""
    state, accepted = close_round(algorithm, state, outcomes, data, work, stats, seed, buffers)
    return state, save_states(client_states, accepted), stats


def drawn_batches(draw, chunk, data, work, seed: int, r: int, params, device):
    """The chunk's batches from the algorithm's own per-client draws (``base.draw_work``)."""
    cpu = {k: v.cpu() for k, v in params.items()}
    drawn = [draw_work(draw, data.clients[p.cid], p.cid, r, seed, work, cpu) for p in chunk]
    batches = {k: v.to(device) for k, v in stack_drawn([b for b, _, _ in drawn]).items()}
    return batches, torch.stack([m for _, m, _ in drawn]).to(device)


def store_for(algorithm, state, client_states, num_clients: int):
    """From the first round on, per-client state lives in a ``ClientStore`` (dense rows, in files
    when large) where the algorithm has any: a fresh run's empty dict becomes a store shaped like
    ``algorithm.new_client_state``; a store, a non-empty dict (e.g. an old checkpoint) or an
    algorithm without per-client tensors is left as it is."""
    if isinstance(client_states, ClientStore) or client_states:
        return client_states
    template = algorithm.new_client_state(state.params)
    template = {**{k: v for k, v in template.items() if k != "uplink"}, "uplink": template["uplink"]}
    leaves = tree_flatten(template)[0]  # (in the order clients return their states)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        return client_states
    return ClientStore(num_clients, template)


def load_states(client_states, cohort: list[int]) -> list:
    """Each cohort client's state, None for a client without one (``train`` initialises it
    from the received parameters, as the loop runtime does)."""
    if isinstance(client_states, ClientStore):
        stacked = client_states.get(cohort)
        return [tree_map(lambda v, i=i: v[i], stacked) for i in range(len(cohort))]
    return [client_states.get(cid) for cid in cohort]


def save_states(client_states, accepted: list):
    """The new client states: a new dict, or the same store with the accepted rows written."""
    if isinstance(client_states, ClientStore):
        if accepted:
            client_states.put([cid for cid, _ in accepted],
                              tree_map(lambda *xs: torch.stack(xs), *[s for _, s in accepted]))
        return client_states
    new = dict(client_states)
    new.update(accepted)
    return new
