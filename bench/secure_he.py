"""Homomorphic sum cost (``atoll.secure.he``): per client encrypt seconds, bytes per client
against float32, server add seconds, key holder decrypt seconds, and the error of the weighted
mean against plaintext FedAvg (max abs error / max |mean|).

    PYTHONPATH=src python bench/secure_he.py --scheme ckks --d 10000 100000 1000000
    PYTHONPATH=src python bench/secure_he.py --scheme paillier --d 10000 --decryptors 1 2

Each of ``--clients`` clients encrypts its own update (float64, N(0, 0.05^2), random record
counts); the server adds all ciphertexts and the key holder decrypts the one sum.
"""
import argparse
import time

import torch

from atoll.secure.he import HomomorphicSum


def one(scheme: str, d: int, clients: int, decryptors: int) -> str:
    st = HomomorphicSum(scheme, max_weight=100.0, decryptors=decryptors)
    t0 = time.perf_counter()
    st.holder  # key generation (once per run)
    keygen = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    like = {"w": torch.zeros(d, dtype=torch.float64)}
    rows = [{"w": torch.randn(d, generator=g, dtype=torch.float64) * 0.05} for _ in range(clients)]
    ns = [int(x) for x in torch.randint(1, 101, (clients,), generator=g)]
    enc = []
    inputs = {}
    for c, (r, n) in enumerate(zip(rows, ns)):
        t0 = time.perf_counter()
        inputs[c] = st.encode(r, n, c)
        enc.append(time.perf_counter() - t0)
    mean, stats = st.aggregate(inputs, 1, like)
    want = sum(n * r["w"] for r, n in zip(rows, ns)) / sum(ns)
    err = float((mean["w"] - want).abs().max() / want.abs().max())
    up = stats["secure_bytes_up"]
    who = f"{scheme}" + (f" decryptors={decryptors}" if scheme == "paillier" else "")
    return (f"| {who} | {d:,} | {clients} | {sum(enc) / len(enc):.3f} | {up / 1e6:.2f} MB "
            f"({up / (4 * d):.1f}x float32) | {stats['secure_server_s']:.3f} | "
            f"{stats['secure_decrypt_s']:.3f} | {keygen:.2f} | {err:.1e} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", choices=["ckks", "paillier"], default="ckks")
    ap.add_argument("--d", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--decryptors", type=int, nargs="+", default=[2])
    a = ap.parse_args()
    print("| scheme | d | clients | encrypt s / client | bytes / client | server add s | decrypt s "
          "| keygen s | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in a.d:
        for t in a.decryptors:
            print(one(a.scheme, d, a.clients, t), flush=True)


if __name__ == "__main__":
    main()
