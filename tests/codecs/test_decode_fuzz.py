"""Decoding may not allocate what the sender chooses (issue 12, section 3).

Every codec's decode, through the server's ``runtime.check.decode_update``, over its honest
payloads mutated by an attacker: shape records claiming 2**32 - 1 coordinates, streams and
counts that do not fit, missing, extra, retyped and resized entries, random bytes flipped,
truncated and appended. Each decode must return or raise ``ValueError`` (nothing else), in less
than ``TIME_S``, and the whole fuzz may not raise the process's peak RSS by more than
``MEMORY_MB`` over the honest decodes'. The fuzz runs in a child process (its own peak RSS,
an address-space limit as a safety net), seeded: the same cases every run.
"""
import json
import os
import random
import resource
import subprocess
import sys
import time

import torch

TIME_S = 2.0      # per decode (honest decodes here take ~1 ms)
MEMORY_MB = 64    # peak RSS growth over the whole fuzz
CODECS = ["identity", "cast(float16)", "cast(bfloat16)", "stochastic_quantize(4)", "top_k(0.05)",
          "rand_k(0.05)", "rand_k(0.2,masked=True)+count_sketch(5,64)", "count_sketch(5,64,k=100)",
          "error_feedback(top_k(0.05))", "error_feedback(top_k(0.05)+stochastic_quantize(4))",
          "rand_k(0.1)+cast(float16)", "dithered_quantize(0.1,2,1.0)"]
HUGE = [(2**32 - 1,), (65535, 65535), (2**16, 2**16, 2**15)]  # an empty record (0, *HUGE)


def _params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g),
            "v": torch.randn(10, generator=g)}


def _mutants(payload: dict, rnd: random.Random):
    """Structured attacks on one payload tree (name -> tensor)."""
    for name, t in payload.items():
        for tail in HUGE:  # every entry (records, data, streams) as an empty record of a huge shape
            yield {**payload, name: torch.empty((0, *tail), dtype=t.dtype)}
        yield {k: v for k, v in payload.items() if k != name}                       # missing
        yield {**payload, name: torch.zeros(1, dtype=t.dtype)}                      # one value
        yield {**payload, name: torch.cat([t.reshape(-1)] * 3) if t.numel() else torch.ones(3, dtype=t.dtype)}
        yield {**payload, name: t.to(torch.float64) if t.dtype != torch.float64 else t.to(torch.int64)}
        if t.dtype == torch.uint8:  # streams: random bytes, all ones, all zeros, a large Rice m
            yield {**payload, name: torch.randint(0, 256, (t.numel() * 4 + 8,), dtype=torch.uint8)}
            yield {**payload, name: torch.full((t.numel() * 8 + 64,), 255, dtype=torch.uint8)}
            yield {**payload, name: torch.zeros(t.numel() * 8 + 64, dtype=torch.uint8)}
            yield {**payload, name: torch.full_like(t, 62)}
        if t.dtype == torch.int64:  # seeds and leaf records: extreme values
            yield {**payload, name: torch.full_like(t, 2**62)}
            yield {**payload, name: torch.full_like(t, -1)}
    yield {**payload, "evil:w": torch.empty(0, 2**32 - 1)}
    yield {**payload, "leaf/evil": torch.tensor([0, 2**31, 2**31])}


def _bytes_mutants(message: bytes, rnd: random.Random, n: int):
    for _ in range(n):
        b = bytearray(message)
        kind = rnd.randrange(4)
        if kind == 0:  # flip bytes, mostly in the header
            for _ in range(rnd.randint(1, 4)):
                b[rnd.randrange(min(len(b), 256))] = rnd.randrange(256)
        elif kind == 1:
            b = b[:rnd.randrange(len(b))]
        elif kind == 2:
            b += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))
        else:
            b = bytearray(rnd.randrange(256) for _ in range(rnd.randint(1, 512)))
        yield bytes(b)


def fuzz(seed: int = 0) -> dict:
    """Run every case; returns the ceilings measured (and any decode that broke the rules)."""
    from atoll import tree as T
    from atoll.algorithm import Algorithm
    from atoll.codecs import build_codec
    from atoll.runtime.check import decode_update
    from atoll.transforms import sgd
    from atoll.transport import wire

    params, rnd = _params(), random.Random(seed)
    cases = []
    for spec in CODECS:
        alg = Algorithm("fuzz", sgd(0.1), sgd(1.0), uplink=build_codec(spec))
        payload, _ = alg.uplink.encode(params, alg.uplink.init(params), 7)
        honest = wire.dumps(T.join({"delta": payload, "aux": {}}))
        decode_update(alg, honest, params)  # warm up: the honest decode's own peak
        for p in _mutants(payload, rnd):
            cases.append((spec, alg, wire.dumps(T.join({"delta": p, "aux": {}}))))
        cases += [(spec, alg, m) for m in _bytes_mutants(honest, rnd, 40)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worst, broken, rejected = 0.0, [], 0
    for spec, alg, message in cases:
        t0 = time.perf_counter()
        try:
            decode_update(alg, message, params)
        except ValueError:
            rejected += 1
        except BaseException as exc:  # noqa: BLE001 (reported: the test asserts there is none)
            broken.append(f"{spec}: {type(exc).__name__}: {str(exc)[:120]}")
        dt = time.perf_counter() - t0
        worst = max(worst, dt)
        if dt > TIME_S:
            broken.append(f"{spec}: one decode took {dt:.2f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"cases": len(cases), "rejected": rejected, "worst_s": worst,
            "peak_growth_mb": peak - base, "broken": broken}


def _child():
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # safety net: 6 GiB address space
    torch.set_num_threads(1)
    print(json.dumps(fuzz()))


def test_every_codec_decode_is_bounded_in_time_and_memory():
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_decode_fuzz as f; f._child()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"decode fuzz: {got['cases']} cases, {got['rejected']} rejected, worst decode "
          f"{got['worst_s'] * 1e3:.1f} ms, peak RSS growth {got['peak_growth_mb']:.1f} MB")
    assert got["broken"] == [], got["broken"][:10]
    assert got["cases"] > 500 and got["rejected"] > 0.5 * got["cases"], got
    assert got["worst_s"] < TIME_S, got
    assert got["peak_growth_mb"] < MEMORY_MB, got
