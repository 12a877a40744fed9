"""Process settings a fast runtime chooses deliberately, once, and reports.

* Threads: one torch intra-op thread per core this process may use (``os.sched_getaffinity``),
  unless told otherwise. A runtime that splits the cores between workers gives each worker its
  share, so the machine is never oversubscribed.
* Allocator (Linux, glibc): by default glibc serves every block above 128 KiB .. 32 MiB with a
  fresh ``mmap`` and unmaps it on free, so every round page-faults its message and stacking
  buffers back in; on a 2-core machine that costs several times the copies themselves (100
  clients of the 2NN: 30 ms instead of 4 ms per pass). ``tune_allocator`` raises
  ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB so those buffers come from the heap and
  are reused. It changes speed, never results; resident memory stays at its high-water mark.
* Garbage collector: a simulation process holds a few hundred thousand long-lived Python
  objects (torch's modules and functions, the data, the model) that every full collection of
  CPython's cyclic collector walks: ~80-100 ms each, about once per 10 rounds of workload B,
  i.e. 10% of its time, and several rounds' worth of a round of workload C. ``freeze_heap``
  runs one collection and then ``gc.freeze()``s what survives, so later collections walk only
  objects created after it. Frozen objects are still freed by reference counting; only a
  reference cycle among them is never collected (a bounded leak of start-up objects).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os

log = logging.getLogger("atoll")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_tuned: str | None = None
_frozen: str | None = None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tune_allocator(limit: int = 2**30) -> str:
    """Keep blocks up to ``limit`` bytes on glibc's heap (idempotent); says what it did."""
    global _tuned
    if _tuned is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(limit)) == 1
            ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(limit)) == 1
            _tuned = (f"glibc heap reuse up to {limit / 2**20:.0f} MiB (mallopt)" if ok
                      else "allocator unchanged (mallopt refused)")
        except (OSError, AttributeError):
            _tuned = "allocator unchanged (no glibc mallopt)"
        log.info("atoll runtime: %s", _tuned)
    return _tuned


def freeze_heap() -> str:
    """Once per process: collect, then move every surviving object out of the collector's
    sight (``gc.freeze``); says what it did."""
    global _frozen
    if _frozen is None:
        gc.collect()
        gc.freeze()
        _frozen = f"{gc.get_freeze_count()} start-up objects frozen out of the cyclic GC (gc.freeze)"
        log.info("atoll runtime: %s", _frozen)
    return _frozen
