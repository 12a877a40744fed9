"""Codec speed and size on a ~1M-parameter update, against the local training that produces it.

    PYTHONPATH=src .venv/bin/python bench/codec_speed.py [--threads 1] [--repeats 5] [--wall]

Model: MLP 784-1000-200-10 (987,210 float32 parameters). The update is a real one: the delta of
one client's local training (50 SGD steps, batch 32, lr 0.05, random inputs: speed does not
depend on them), timed too as "training per client-round". For each uplink codec: best-of-N
encode and decode time (decode from the serialised bytes, as the server does), wire bytes,
compression ratio against the float32 update's wire bytes, and the relative L2 error of the
decoded update. Then the seed-004 server parts on the same size: one ``server_topk`` step
(k = 1%), one ``DeltaTracker`` commit, one client message and its ``apply``.

Times are the process's CPU time (``time.process_time``) with one torch thread by default: on a
machine shared with other jobs that measures the work done, where wall time measures the queue.
``--wall`` times wall clock instead (use it with ``--threads N`` on a quiet machine).
"""
import argparse
import math
import time

import torch

from atoll import codecs
from atoll import tree as T
from atoll.client import local_training, model_loss, params_of
from atoll.downlink import DeltaTracker, apply, server_topk
from atoll.models.zoo import mlp
from atoll.transforms import apply_updates, chain, sgd
from atoll.transport import wire


CLOCK = time.process_time


def best(fn, repeats):
    fn()  # warm-up (and the count sketch's hash plan)
    out, sec = None, float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        out = fn()
        sec = min(sec, CLOCK() - t0)
    return out, sec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wall", action="store_true", help="time wall clock, not process CPU time")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.wall else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mlp(784, 10, hidden=(1000, 200))
    params = params_of(model)
    d = T.size(params)
    steps, batch = 50, 32
    batches = {"x": torch.randn(steps, batch, 784), "y": torch.randint(0, 10, (steps, batch)),
               "mask": torch.ones(steps, batch, dtype=torch.bool)}
    update = local_training(model_loss(model), sgd(0.05))
    result, train = best(lambda: update(params, {}, {}, batches, torch.ones(steps, dtype=torch.bool), 1),
                         max(1, args.repeats // 2))
    delta = result.delta
    dense = len(wire.dumps(delta))
    norm = float(T.norm(delta))
    print(f"MLP 784-1000-200-10: d = {d:,} float32; {args.threads} torch thread(s); "
          f"{'wall-clock' if args.wall else 'process CPU'} time, best of {args.repeats}")
    print(f"local training ({steps} steps, batch {batch}): {train * 1e3:.0f} ms per client-round; "
          f"float32 update {dense:,} bytes\n")
    print(f"{'codec':52s} {'encode':>9s} {'decode':>9s} {'bytes':>10s} {'ratio':>7s} {'rel.err':>8s}")
    specs = ["identity", "cast(float16)", "cast(bfloat16)", "stochastic_quantize(4)", "stochastic_quantize(2)",
             "top_k(0.01)", "rand_k(0.01)", "top_k(0.01)+stochastic_quantize(4)",
             "error_feedback(top_k(0.01)+stochastic_quantize(4))", "count_sketch(5, 20000, k=10000)",
             "rand_k(0.1, masked=True)+count_sketch(5, 20000, k=10000)"]
    for spec in specs:
        codec = codecs.build_codec(spec)
        state = codec.init(params)
        (payload, _), enc = best(lambda: codec.encode(delta, state, 7), args.repeats)
        data = wire.dumps(payload)
        back, dec = best(lambda: codec.decode(wire.loads(data)), args.repeats)
        err = float(T.norm(T.sub(back, delta))) / norm
        print(f"{codec.name:52s} {enc * 1e3:7.1f}ms {dec * 1e3:7.1f}ms {len(data):10,d} "
              f"{dense / len(data):7.1f} {err:8.3f}")
        if spec == "top_k(0.01)":
            index = sum(payload[f"topk/{e}"].numel() for e in "qrm")
            top_bits = 8 * index / payload["topk/v"].numel()
    print(f"top_k(0.01) index coding: {top_bits:.1f} bits per index (plain positions: {math.ceil(math.log2(d))})")

    print("\nseed 004, server side (k = 1% of d)")
    server = chain(server_topk(0.01), sgd(1.0))
    opt = server.init(params)
    grads = T.scale(delta, -1.0)
    (updates, _), step = best(lambda: server.update(grads, opt, params, {}), args.repeats)
    new = apply_updates(params, updates)
    tracker = DeltaTracker(1000)
    ts = tracker.init(params)
    _, ts = tracker.messages(ts, [0], params)
    ts2, commit = best(lambda: tracker.commit(ts, params, new), args.repeats)
    (msgs, _), send = best(lambda: tracker.messages(ts2, [0], new), args.repeats)
    data = wire.dumps(msgs[0])
    held, recv = best(lambda: apply(params, wire.loads(data)), args.repeats)
    assert all(torch.equal(held[k], new[k]) for k in new)
    print(f"  server_topk step      {step * 1e3:7.1f} ms")
    print(f"  DeltaTracker.commit   {commit * 1e3:7.1f} ms")
    print(f"  message (1 client)    {send * 1e3:7.1f} ms   {len(data):,} bytes ({dense / len(data):.0f}x fewer than dense)")
    print(f"  client apply          {recv * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
