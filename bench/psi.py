"""ECDH-PSI between two party processes over loopback gRPC with TLS and a token; prints per party
the wall seconds of the protocol (hello to result), its CPU seconds (crypto workers included),
the seconds per phase, the payload bytes per item and the peak memory.

    PYTHONPATH=src python bench/psi.py [--n 100000] [--overlap 0.5] [--workers 1]
                                       [--learn intersection|size] [--solo]

Party A (the dialer) holds ids 0..n-1, party B (the listener) n - overlap*n .. 2n - overlap*n - 1;
both ask to learn ``--learn``. Both parties share this machine's cores (and the other users of
it: the load average is printed before and after), so a party with a machine of its own would
see its CPU seconds / workers at best. ``--solo`` times what one party computes (hash and blind
its n items, then blind n items of the peer) with ``--workers`` processes and no peer running.
"""
import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path


def items(n, start):
    return [f"id{k}" for k in range(start, start + n)]


def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def rss():
    """Peak resident memory of this party's process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def listener(d, args, start, port_q, out_q):
    from atoll.deploy import certs
    from atoll.transport.grpc.psi import PsiServer
    registry = certs.load_registry(d)
    tls = {k: (Path(d) / f).read_bytes() for k, f in (("key", "server.key"), ("cert", "server.pem"),
                                                       ("ca", "ca.pem"))}

    def identify(kind, value):
        name = certs.by_token(registry, value) if kind == "token" else None
        return (name, registry[name]["id"]) if name else None

    mine = items(args.n, start)
    server = PsiServer(mine, identify, tls=tls, learn=args.learn, reveal=args.learn,
                       workers=args.workers, timeout=300.0)
    port_q.put(server.start())
    c0 = cpu()
    server.wait(1, timeout=3600)
    server.stop()
    if server.errors:
        raise server.errors[0][1]
    out_q.put(("B (listens)", server.results[0][1], cpu() - c0, args.n, rss()))


def dialer(d, args, port, out_q):
    from atoll.transport.grpc.psi import psi_connect
    mine = items(args.n, 0)
    creds = {"ca": (Path(d) / "ca.pem").read_bytes(),
             "token": (Path(d) / "clients" / "party-a.token").read_text().strip()}
    c0 = cpu()
    res = psi_connect(f"localhost:{port}", mine, creds=creds, learn=args.learn, reveal=args.learn,
                      workers=args.workers, timeout=300.0)
    out_q.put(("A (dials)", res, cpu() - c0, args.n, rss()))


def solo(args):
    import secrets

    from atoll.vertical import psi
    mine = [x.encode() for x in items(args.n, 0)]
    scalar, session, chunk = secrets.token_bytes(32), secrets.token_bytes(32), psi.CHUNK
    engine = psi._Engine(args.workers)
    try:
        engine.map(psi._reblind_task, [(scalar, psi.hash_to_group([b"warm"], session), 0)] * args.workers)
        t0, c0 = time.perf_counter(), cpu()
        blinded = b"".join(engine.map(psi._blind_task, [(scalar, session, mine[i:i + chunk], i)
                                                   for i in range(0, len(mine), chunk)]))
        t1 = time.perf_counter()
        tasks = [(scalar, blinded[i:i + chunk * 32], i // 32) for i in range(0, len(blinded), chunk * 32)]
        for _ in engine.map(psi._reblind_task, tasks):
            pass
        t2 = time.perf_counter()
    finally:
        engine.close()
    print(f"one party alone, n = {args.n}, {args.workers} worker(s): hash+blind {t1 - t0:.1f} s, "
          f"blind the peer's {t2 - t1:.1f} s, total {t2 - t0:.1f} s wall, cpu {cpu() - c0:.1f} s; "
          f"{(t2 - t0) / (2 * args.n) * 1e6:.1f} us per exponentiation; load average "
          f"{os.getloadavg()[0]:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--learn", default="intersection", choices=["intersection", "size"])
    ap.add_argument("--solo", action="store_true")
    args = ap.parse_args()
    if args.solo:
        return solo(args)
    from atoll.deploy import certs
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        certs.init(d)
        certs.issue(d, "party-a", token=True)
        port_q, out_q = ctx.Queue(), ctx.Queue()
        start = args.n - int(args.overlap * args.n)
        print(f"n = {args.n} x {args.n}, overlap {args.overlap}, learn {args.learn}, "
              f"{args.workers} worker(s) per party, {os.cpu_count()} cores, "
              f"load average before {os.getloadavg()[0]:.2f}")
        b = ctx.Process(target=listener, args=(d, args, start, port_q, out_q))
        b.start()
        a = ctx.Process(target=dialer, args=(d, args, port_q.get(timeout=120), out_q))
        t0 = time.perf_counter()
        a.start()
        rows = [out_q.get(timeout=3600) for _ in range(2)]
        wall = time.perf_counter() - t0
        a.join(60), b.join(60)
    peak_mb = {r[0]: r[4] for r in rows}
    for name, res, cpu_s, n, _ in sorted(rows, key=lambda r: r[0]):
        phases = " ".join(f"{k} {v:.1f}" for k, v in res.seconds.items() if k != "total")
        print(f"party {name}: wall {res.seconds['total']:.1f} s, cpu {cpu_s:.1f} s; phases [{phases}]; "
              f"intersection size {res.size}; payload sent {res.bytes_sent / 1e6:.1f} MB, "
              f"received {res.bytes_received / 1e6:.1f} MB = {res.bytes_sent / n:.0f} B out and "
              f"{res.bytes_received / n:.0f} B in per own item; peak memory "
              f"{peak_mb[name]:.0f} MB")
    print(f"both parties, process start to last result: {wall:.1f} s; "
          f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
