"""Allocation attacks on uplink decoding: one empty shape record ``(0, D)`` in an otherwise honest
payload, decoded by the server's ``decode_update`` (docs/communication.md, "Decoding untrusted
bytes"). Each case runs in its own process under a 5 GiB address-space limit and prints the
message size, the decode time, the growth of peak RSS and the outcome.

    PYTHONPATH=src python bench/decode_bomb.py
"""
import resource
import subprocess
import sys
import time

CASES = [("top_k(0.05)", "topk", 2**28), ("rand_k(0.05)", "randk", 2**28),
         ("count_sketch(5,64,k=100)", "sketch", 2**24), ("cast(float16)", "cast", 2**28),
         ("stochastic_quantize(4)", "sq", 2**28)]


def one(spec: str, prefix: str, d: int) -> str:
    import torch

    from atoll import tree as T
    from atoll.algorithm import Algorithm
    from atoll.codecs import build_codec
    from atoll.runtime.check import decode_update
    from atoll.transforms import sgd
    from atoll.transport import wire

    resource.setrlimit(resource.RLIMIT_AS, (5 << 30, 5 << 30))
    torch.set_num_threads(1)
    params = {"w": torch.randn(64, 32), "b": torch.randn(32), "v": torch.randn(10)}
    alg = Algorithm("bomb", sgd(0.1), sgd(1.0), uplink=build_codec(spec))
    honest, _ = alg.uplink.encode(params, alg.uplink.init(params), 7)
    decode_update(alg, wire.dumps(T.join({"delta": honest, "aux": {}})), params)  # warm up
    bomb = {f"{prefix}:w": torch.empty(0, d), **{k: v for k, v in honest.items()
                                                  if not k.startswith(prefix + ":")}}
    msg = wire.dumps(T.join({"delta": bomb, "aux": {}}))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    try:
        decode_update(alg, msg, params)
        out = "accepted"
    except Exception as exc:  # noqa: BLE001 (reported)
        out = f"{type(exc).__name__}: {str(exc)[:80]}"
    dt = time.perf_counter() - t0
    grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return f"{spec:26s} D={d:<10d} {len(msg):5d} B {dt:7.3f} s  +{grow:6.0f} MB  {out}"


if __name__ == "__main__":
    if len(sys.argv) == 4:
        print(one(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    else:
        for spec, prefix, d in CASES:
            subprocess.run([sys.executable, __file__, spec, prefix, str(d)], timeout=600)
