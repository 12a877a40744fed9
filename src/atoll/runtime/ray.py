"""``RayRuntime``: the cohort sharded across Ray workers, each running the vectorised engine.

Optional extra ``atoll[ray]``; only this module imports Ray. Without ``address`` it starts a
local Ray instance with one CPU per worker; with ``address=`` ("auto" or "ray://host:port")
it joins an existing cluster. Start-up is paid once per run, not per round: the first round
starts Ray, creates the worker actors and ships each of them the data, the algorithm and the
client update once (``ray.put``); later rounds send only the broadcast bytes, the shard's
client ids and states, and receive the shard's uplink messages back to back in one array
(``pack_messages``).

A worker is a ``VmapRuntime`` with ``threads`` torch threads (default: the driver's usable
cores divided by the workers, at least 1, so a local instance never oversubscribes the
machine). It runs exactly ``VmapRuntime.train`` on its shard, and the driver finishes the round
with the same ``round.close_round`` as every runtime: results equal ``LoopRuntime``'s (float64, 1e-9).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
from torch.utils._pytree import tree_map

from atoll.runtime.base import LocalWork
from atoll.runtime.host import usable_cores
from atoll.runtime.decode import DecodeBuffers
from atoll.runtime.vmap import VmapRuntime, begin_round, end_round

log = logging.getLogger("atoll")


class _Worker:
    """One Ray actor: a VmapRuntime plus the run's data and program, received once."""

    def __init__(self, device: str, threads: int, budget: int):
        self.runtime = VmapRuntime(device=device, threads=threads, memory_budget_bytes=budget)
        self.runtime.start()
        self.data = self.program = None

    def ready(self) -> str:
        return self.runtime.describe()

    def load(self, data=None, program=None) -> None:
        if data is not None:
            self.data = data
        if program is not None:
            self.program = program

    def train(self, down_bytes, cstates, cohort, work, seed, r):
        algorithm, client_update = self.program
        outcomes = self.runtime.train(algorithm, client_update, down_bytes, cstates, cohort,
                                      self.data, work, seed, r)
        return pack_messages(outcomes)


def start_local(ray, num_cpus: int, attempts: int = 2) -> None:
    """Start a local Ray instance; on a loaded machine Ray's own start-up can time out, so a
    failed start is shut down and tried again (``attempts`` in all), then reported."""
    for i in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            return
        except Exception as exc:  # Ray raises a bare Exception when its node times out
            ray.shutdown()
            if i + 1 == attempts:
                raise RuntimeError(f"RayRuntime: a local Ray instance did not start after "
                                   f"{attempts} attempts: {exc}") from exc
            log.warning("RayRuntime: local Ray did not start (%s); trying again", exc)


class RayRuntime:
    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, device: str = "cpu",
                 memory_budget_bytes: int = 2**30, threads: int | None = None):
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise ImportError("runtime.name = \"ray\" needs Ray: pip install 'atoll[ray]'") from exc
        self.address, self.workers, self.device = address, workers, device
        self.budget, self.threads = int(memory_budget_bytes), threads
        self.actors: list = []
        self.startup_s: float | None = None
        self._shipped: dict[str, int] = {}
        self._buffers = DecodeBuffers()

    def describe(self) -> str:
        where = self.address or "a local Ray instance"
        return (f"RayRuntime: {len(self.actors) or self.workers} workers on {where}, "
                f"{self.threads} torch thread(s) each")

    def start(self) -> None:
        """Start or join Ray and create the workers (once per run)."""
        if self.actors:
            return
        import ray

        t0 = time.perf_counter()
        cores = usable_cores()
        self.workers = self.workers or (cores if self.address is None else 2)
        self.threads = self.threads or max(1, cores // self.workers)
        if not ray.is_initialized():
            if self.address is None:
                start_local(ray, self.workers * self.threads)
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        cls = ray.remote(num_cpus=self.threads)(_Worker)
        self.actors = [cls.remote(self.device, self.threads, self.budget) for _ in range(self.workers)]
        ray.get([a.ready.remote() for a in self.actors])
        self.startup_s = time.perf_counter() - t0
        log.info("%s; started in %.1f s", self.describe(), self.startup_s)

    def _ship(self, data, algorithm, client_update) -> None:
        """Send the data and the program to every worker, once per object."""
        import ray

        send = {}
        if self._shipped.get("data") != id(data):
            send["data"] = ray.put(_owning(data))
        if self._shipped.get("program") != id(client_update) or self._shipped.get("alg") != id(algorithm):
            send["program"] = ray.put((algorithm, client_update))
        if send:
            ray.get([a.load.remote(**send) for a in self.actors])
            self._shipped.update(data=id(data), program=id(client_update), alg=id(algorithm))

    def run_round(self, algorithm, client_update, state, client_states, cohort: list[int], data,
                  work: LocalWork, seed: int):
        """One synchronous round over ``cohort``. Returns (state, client_states, stats)."""
        import ray

        self.start()
        self._ship(data, algorithm, client_update)
        r, stats, down_bytes, state, client_states, cstates = begin_round(
            algorithm, state, client_states, cohort, data, seed)
        shards = shard(cohort, [data.clients[c].n for c in cohort], len(self.actors))
        futures = [a.train.remote(down_bytes, [_own(cstates[i]) for i in pos],
                                  [cohort[i] for i in pos], work, seed, r)
                   for a, pos in zip(self.actors, shards) if pos]
        outcomes = []
        for pos, packed in zip([p for p in shards if p], ray.get(futures)):
            for o in unpack_messages(*packed):
                o.pos = pos[o.pos]
                outcomes.append(o)
        return end_round(algorithm, state, client_states, outcomes, data, work, stats,
                         self._buffers, seed, r)

    def shutdown(self) -> None:
        """Stop the workers (and the local Ray instance this runtime started)."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.address is None and ray.is_initialized():
            ray.shutdown()


def pack_messages(outcomes: list) -> tuple[list, np.ndarray]:
    """``(outcomes without their messages, one uint8 array of all messages back to back)``:
    one copy out of the worker's reused message rows, and Ray ships a numpy array out of band
    (to the driver on the same node without another copy), where a list of ``bytes`` would be
    pickled into the task's result and copied on both sides."""
    sizes = [len(o.message) if o.message is not None else -1 for o in outcomes]
    blob = np.empty(sum(max(n, 0) for n in sizes), dtype=np.uint8)
    at = 0
    for o, n in zip(outcomes, sizes):
        if n >= 0:
            blob[at:at + n] = np.frombuffer(o.message, dtype=np.uint8)
            at += n
        o.message = n  # the message's length, or -1 for none
    return outcomes, blob


def unpack_messages(outcomes: list, blob: np.ndarray) -> list:
    """Inverse of ``pack_messages``: each message a read-only view of ``blob``."""
    view, at = memoryview(blob).toreadonly(), 0
    for o in outcomes:
        n, o.message = o.message, None
        if n >= 0:
            o.message, at = view[at:at + n], at + n
    return outcomes


def _owning(obj):
    """``obj`` (tensors, dataclasses and lists of them) with every tensor that views a larger
    storage copied: pickling a view ships its whole base (100 slices of one array = 100 arrays)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size() else obj
    if isinstance(obj, list):
        return [_owning(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _owning(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _own(cstate):
    """A client state whose tensors own their memory (a view would ship its whole base)."""
    return None if cstate is None else tree_map(
        lambda v: v.clone() if isinstance(v, torch.Tensor) else v, cstate)


def shard(cohort: list[int], sizes: list[int], workers: int) -> list[list[int]]:
    """Cohort positions split into ``workers`` shards of about equal total samples (largest
    client first onto the lightest shard); each shard keeps cohort order."""
    loads, parts = [0] * workers, [[] for _ in range(workers)]
    for i in sorted(range(len(cohort)), key=lambda i: (-sizes[i], i)):
        w = loads.index(min(loads))
        parts[w].append(i)
        loads[w] += max(sizes[i], 1)
    return [sorted(p) for p in parts]
