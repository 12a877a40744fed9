"""SecAgg+ cost and exactness at the issue's scale: n clients, d coordinates, k neighbours,
a fraction dropping after sharing (stage 3, the server's most expensive case).

    PYTHONPATH=src python bench/secure_secagg.py [--n 100] [--d 1000000] [--k 20] [--drop 0.1]
    PYTHONPATH=src python bench/secure_secagg.py --collisions 1000000   # mask PRG collision check

Prints per-client crypto seconds (mean, max), server seconds, bytes per client per stage,
whether the unmasked sum equals the plaintext modular sum bit for bit, and the cost of one X25519
key agreement (`--json PATH` also writes the figures; bench/secure_vs_flower.sh reads them).
"""
import argparse
import json
import math
import os
import time

import numpy as np

from atoll.secure import primitives as pr
from atoll.secure import secagg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--collisions", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=1000, help="key agreements timed (X25519 + HKDF)")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()
    if a.collisions:
        t0 = time.perf_counter()
        seen = set()
        for _ in range(a.collisions):  # a fresh X25519 pair each time, the mask seed through HKDF
            (sk, _), (_, pk) = pr.keypair(), pr.keypair()
            seen.add(pr.prg(pr.agree(sk, pk, b"mask"), 2, 32).tobytes())
        print(f"{a.collisions} key pairs: {a.collisions - len(seen)} collisions of the first 64 "
              f"mask bits ({time.perf_counter() - t0:.0f} s)")
        return
    st = secagg.Setup.new(range(a.n), 1, a.d, a.bits, neighbours=a.k)
    g = np.random.default_rng(0)
    x = {u: g.integers(0, 1 << a.bits, a.d, dtype=np.uint64) for u in range(a.n)}
    gone = set(g.choice(a.n, size=int(a.drop * a.n), replace=False).tolist())
    t0 = time.perf_counter()
    total, survivors, clients, server = secagg.run(st, x, drop={3: gone})
    wall = time.perf_counter() - t0
    expect = np.sum([x[u] for u in survivors], axis=0, dtype=np.uint64) & np.uint64((1 << st.bits) - 1)
    secs = [c.seconds for u, c in clients.items() if u in survivors]
    masked = math.ceil(a.d * st.bits / 8)
    share_ct = 12 + 16 + 2 * 4 * 11  # nonce + tag + two shares of 11 field elements
    print(f"n={a.n} d={a.d} k={st.neighbours} t={st.threshold} ring bits={st.bits} dropped={len(gone)} "
          f"(after sharing)")
    print(f"exact: {bool((total == expect).all())}")
    print(f"client crypto s: mean {np.mean(secs):.3f}, max {np.max(secs):.3f}; server s: crypto {server.seconds:.3f}, "
          f"unpack+sum {server.decode_seconds:.3f}; "
          f"wall (all in one process) {wall:.1f}")
    print(f"bytes per client: advertise 64, shares {st.neighbours * share_ct}, masked input {masked} "
          f"({8 * masked / a.d:.1f} bits/coordinate; float32 would be {4 * a.d}), unmask <= "
          f"{st.neighbours * (1 + 44)}")
    agree = agree_us(a.pairs)
    t0 = time.perf_counter()
    pr.pack(g.integers(0, 1 << st.bits, a.d, dtype=np.uint64), st.bits)
    pack = time.perf_counter() - t0
    print(f"key agreement X25519 + HKDF: {agree:.0f} us/pair ({a.pairs} pairs); bit-packing one masked "
          f"vector (a client's, not in its crypto s): {pack:.3f} s")
    if a.json:
        fig = dict(n=a.n, d=a.d, k=st.neighbours, threshold=st.threshold, ring_bits=st.bits,
                   dropped=len(gone), exact=bool((total == expect).all()), client_mean=float(np.mean(secs)),
                   client_max=float(np.max(secs)), server_s=server.seconds + server.decode_seconds,
                   wall=wall, x25519_us_per_pair=agree, pack_s=pack,
                   up=[64, st.neighbours * share_ct, masked, st.neighbours * (1 + 44)])
        with open(a.json, "w") as f:
            json.dump(fig, f, indent=1)


def agree_us(pairs):
    """Microseconds per key agreement as a client runs it: X25519 from raw keys, then HKDF."""
    keys = [pr.keypair() for _ in range(pairs + 1)]
    t0 = time.perf_counter()
    for i in range(pairs):
        pr.agree(keys[i][0], keys[i + 1][1], b"mask")
    return 1e6 * (time.perf_counter() - t0) / pairs

if __name__ == "__main__":
    main()
