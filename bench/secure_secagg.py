"""SecAgg+ cost and exactness at the issue's scale: n clients, d coordinates, k neighbours,
a fraction dropping after sharing (stage 3, the server's most expensive case).

    PYTHONPATH=src python bench/secure_secagg.py [--n 100] [--d 1000000] [--k 20] [--drop 0.1]
    PYTHONPATH=src python bench/secure_secagg.py --collisions 1000000   # mask PRG collision check
    PYTHONPATH=src python bench/secure_secagg.py --malicious   # against a malicious server

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
from atoll.secure.active import Simulated


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--collisions", type=int, default=0)
    ap.add_argument("--malicious", action="store_true", help="signed keys and the consistency check")
    ap.add_argument("--pairs", type=int, default=1000, help="key agreements timed (X25519 + HKDF)")
    ap.add_argument("--json", help="also write the figures to this file")
    return ap.parse_args()


def collisions(n):
    t0 = time.perf_counter()
    seen = set()
    for _ in range(n):  # a fresh X25519 pair each time, the mask seed through HKDF
        (sk, _), (_, pk) = pr.keypair(), pr.keypair()
        seen.add(pr.prg(pr.agree(sk, pk, b"mask"), 2, 32).tobytes())
    print(f"{n} key pairs: {n - len(seen)} collisions of the first 64 mask bits "
          f"({time.perf_counter() - t0:.0f} s)")


def main():
    a = parse()
    if a.collisions:
        return collisions(a.collisions)
    st = secagg.Setup.new(range(a.n), 1, a.d, a.bits, neighbours=a.k, malicious=a.malicious)
    g = np.random.default_rng(0)
    x = {u: g.integers(0, 1 << a.bits, a.d, dtype=np.uint64) for u in range(a.n)}
    gone = set(g.choice(a.n, size=int(a.drop * a.n), replace=False).tolist())
    t0 = time.perf_counter()
    total, survivors, clients, server = secagg.run(st, x, drop={3: gone},
                                                   active=Simulated() if a.malicious else None)
    wall = time.perf_counter() - t0
    expect = np.sum([x[u] for u in survivors], axis=0, dtype=np.uint64) & np.uint64((1 << st.bits) - 1)
    secs = [c.seconds for u, c in clients.items() if u in survivors]
    masked = math.ceil(a.d * st.bits / 8)
    share_ct = 12 + 16 + 2 * 4 * 11  # nonce + tag + two shares of 11 field elements
    t0 = time.perf_counter()
    pr.pack(g.integers(0, 1 << st.bits, a.d, dtype=np.uint64), st.bits)
    fig = dict(n=a.n, d=a.d, k=st.neighbours, threshold=st.threshold, ring_bits=st.bits, dropped=len(gone),
               exact=bool((total == expect).all()), client_mean=float(np.mean(secs)),
               client_max=float(np.max(secs)), server_crypto_s=server.seconds,
               server_decode_s=server.decode_seconds, server_s=server.seconds + server.decode_seconds,
               wall=wall, pack_s=time.perf_counter() - t0, x25519_us_per_pair=agree_us(a.pairs),
               up=[64, st.neighbours * share_ct, masked, st.neighbours * (1 + 44)], malicious=a.malicious)
    if a.malicious:  # the advertisement carries a signature and a credential; the check, a signature
        fig["up"] = [64 + 64 + 65, *fig["up"][1:3], 64, fig["up"][3]]
    report(fig, a.pairs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(fig, f, indent=1)


def report(f, pairs):
    print(f"n={f['n']} d={f['d']} k={f['k']} t={f['threshold']} ring bits={f['ring_bits']} "
          f"dropped={f['dropped']} (after sharing){' MALICIOUS-SERVER mode' if f['malicious'] else ''}")
    print(f"exact: {f['exact']}")
    print(f"client crypto s: mean {f['client_mean']:.3f}, max {f['client_max']:.3f}; server s: crypto "
          f"{f['server_crypto_s']:.3f}, unpack+sum {f['server_decode_s']:.3f}; "
          f"wall (all in one process) {f['wall']:.1f}")
    up = f["up"]
    check = f", consistency check {up[3]}" if f["malicious"] else ""
    print(f"bytes per client: advertise {up[0]}, shares {up[1]}, masked input {up[2]} "
          f"({8 * up[2] / f['d']:.1f} bits/coordinate; float32 would be {4 * f['d']}){check}, "
          f"unmask <= {up[-1]}")
    print(f"key agreement X25519 + HKDF: {f['x25519_us_per_pair']:.0f} us/pair ({pairs} pairs); bit-packing "
          f"one masked vector (a client's, not in its crypto s): {f['pack_s']:.3f} s")

def agree_us(pairs):
    """Microseconds per key agreement as a client runs it: X25519 from raw keys, then HKDF."""
    keys = [pr.keypair() for _ in range(pairs + 1)]
    t0 = time.perf_counter()
    for i in range(pairs):
        pr.agree(keys[i][0], keys[i + 1][1], b"mask")
    return 1e6 * (time.perf_counter() - t0) / pairs

if __name__ == "__main__":
    main()
