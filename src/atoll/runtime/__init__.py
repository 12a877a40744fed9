"""Runtimes: who runs the clients of a round, and where.

``LoopRuntime`` (reference, one client after another), ``VmapRuntime`` (clients trained
together in chunks, CPU or GPU) and ``RayRuntime`` (the cohort sharded over Ray workers, each
running the vectorised engine; optional extra ``atoll[ray]``). ``make_runtime`` turns the
``[runtime]`` config section into one of them; ``auto`` is the vectorised runtime.
"""
from __future__ import annotations


def make_runtime(cfg=None):
    """A runtime from a ``RuntimeConfig`` (or None for the default, ``auto``)."""
    from atoll.runtime.loop import LoopRuntime
    from atoll.runtime.vmap import VmapRuntime

    name = getattr(cfg, "name", "auto")
    device = getattr(cfg, "device", "auto")
    budget = int(getattr(cfg, "memory_budget_mb", 1024) * 2**20)
    threads = getattr(cfg, "threads", None)
    if name == "loop":
        return LoopRuntime()
    if name in ("auto", "vmap"):
        return VmapRuntime(device=device, memory_budget_bytes=budget, threads=threads)
    if name == "ray":
        from atoll.runtime.ray import RayRuntime

        return RayRuntime(address=getattr(cfg, "ray_address", None),
                          workers=getattr(cfg, "ray_workers", None), device=device,
                          memory_budget_bytes=budget)
    raise ValueError(f"runtime.name must be one of auto, loop, vmap, ray; got {name!r}")


__all__ = ["make_runtime"]
