"""ECDH-PSI between two party processes over loopback gRPC with TLS and a token; prints per party
the wall seconds from its process start to its result, its CPU seconds (the whole process, crypto
workers included), the seconds per protocol phase, the payload bytes per item and peak memory.

    PYTHONPATH=src python bench/psi.py [--n 100000] [--overlap 0.5] [--workers 1]
                                       [--learn intersection|size] [--replay] [--json FILE] [--solo]

Party A (the dialer) holds ids 0..n-1, party B (the listener) n - overlap*n .. 2n - overlap*n - 1;
both ask to learn ``--learn``. In the live run both parties share this machine's cores (and the
other users of it: the load average is printed before and after). ``--replay`` then times each
party alone, as on a host of its own: the live run records both parties' messages (each party's
secrets drawn from a fixed stream, bench/psi_replay.py), and each party runs again, live over
gRPC, against a replay peer that sends the other's recorded messages at the party's own pace and
computes nothing. ``--solo`` times one party's crypto (n own + n peer exponentiations) alone.
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time

import psi_replay


def items(n, start):
    return [f"id{k}" for k in range(start, start + n)]


def rss():
    """Peak resident memory of this party's process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _row(name, res, args, role, mine):
    wall, cpu = time.time() - role["t0"], psi_replay._cpu()
    start = _b_start(args)  # both hold their ids in increasing order: so is the intersection
    ok = res.size == args.n - start and res.intersection in (None, items(args.n - start, start))
    return {"name": name, "wall": wall, "cpu": cpu, "protocol": res.seconds["total"],
            "phases": {k: v for k, v in res.seconds.items() if k != "total"}, "size": res.size,
            "correct": ok, "sent": res.bytes_sent, "received": res.bytes_received, "n": len(mine),
            "rss": rss()}


def _b_start(args):
    return args.n - int(args.overlap * args.n)


def listener(d, args, port_q, out_q, role):
    """Party B. ``role``: t0 (wall clock at its process start), seed and record (bench-only)."""
    from atoll.transport.grpc.psi import PsiServer
    if role.get("seed"):
        psi_replay.seed(role["seed"])

    class Server(PsiServer):
        def _session(self, name, ch):  # the recording is saved before the session is reported
            super()._session(name, psi_replay.Recorder(ch, role["record"]) if role.get("record") else ch)

    mine = items(args.n, _b_start(args))
    server = Server(mine, psi_replay.identify_token(d), tls=psi_replay.server_tls(d),
                    learn=args.learn, reveal=args.learn, workers=args.workers, timeout=300.0)
    port_q.put(server.start())
    server.wait(1, timeout=3600)
    if server.errors:
        server.stop()
        raise server.errors[0][1]
    row = _row("B (listens)", server.results[0][1], args, role, mine)
    server.stop()
    out_q.put(row)


def dialer(d, args, port, out_q, role):
    """Party A; ``role`` as for ``listener``."""
    from atoll.transport.grpc.psi import dial
    from atoll.vertical.psi import run_psi
    if role.get("seed"):
        psi_replay.seed(role["seed"])
    mine = items(args.n, 0)
    with dial(f"localhost:{port}", **psi_replay.dial_creds(d)) as ch:
        rec = psi_replay.Recorder(ch, role["record"]) if role.get("record") else ch
        res = run_psi(rec, mine, learn=args.learn, reveal=args.learn, workers=args.workers,
                      timeout=300.0)
    row = _row("A (dials)", res, args, role, mine)
    if role.get("record"):
        psi_replay.save(rec.sent, role["record"])  # before the row: the parent replays it next
    out_q.put(row)


def _collect(out_q, procs, k):
    """``k`` rows from the party processes; a process that died ends the bench with its exit code."""
    import queue
    rows, end = [], time.time() + 7200
    while len(rows) < k and time.time() < end:
        try:
            rows.append(out_q.get(timeout=5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"a party process failed (exit code {dead[0]}); see above")
    return rows


def live(ctx, d, args, rec):
    """Both parties live; with ``rec`` (a folder) each seeded and recording what it sends."""
    port_q, out_q = ctx.Queue(), ctx.Queue()
    role = lambda who: {"t0": time.time(), "seed": rec and who, "record": rec and f"{rec}/{who}"}  # noqa: E731
    b = ctx.Process(target=listener, args=(d, args, port_q, out_q, role("B")))
    t0 = time.time()
    b.start()
    a = ctx.Process(target=dialer, args=(d, args, port_q.get(timeout=120), out_q, role("A")))
    a.start()
    rows = sorted(_collect(out_q, (a, b), 2), key=lambda r: r["name"])
    wall = time.time() - t0
    a.join(60), b.join(60)
    return rows, wall


def replay_one(ctx, d, args, rec, who):
    """Party ``who`` alone against a replay of the other; returns (its row, the replay peer's)."""
    port_q, out_q, ready_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    other = "B" if who == "A" else "A"
    files = (f"{rec}/{other}", f"{rec}/{who}")
    if who == "A":
        peer = ctx.Process(target=psi_replay.replay_listener, args=(d, *files, port_q, out_q))
        peer.start()
        port = port_q.get(timeout=600)
        party = ctx.Process(target=dialer, args=(d, args, port, out_q, {"t0": time.time(), "seed": "A"}))
    else:
        peer = ctx.Process(target=psi_replay.replay_dialer, args=(d, *files, ready_q, port_q, out_q))
        peer.start()
        ready_q.get(timeout=600)
        party = ctx.Process(target=listener, args=(d, args, port_q, out_q, {"t0": time.time(), "seed": "B"}))
    party.start()
    rows = _collect(out_q, (party, peer), 2)
    party.join(60), peer.join(60)
    return sorted(rows, key=lambda r: r["name"] == "replay peer")


def _line(r, args):
    phases = " ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
    return (f"wall {r['wall']:.1f} s (process start to result; protocol {r['protocol']:.1f} s), "
            f"cpu {r['cpu']:.1f} s; phases [{phases}]; intersection size {r['size']} "
            f"({'right' if r['correct'] else 'WRONG'}); payload sent {r['sent'] / 1e6:.1f} MB, "
            f"received {r['received'] / 1e6:.1f} MB = {r['sent'] / r['n']:.0f} B out and "
            f"{r['received'] / r['n']:.0f} B in per own item; peak memory {r['rss']:.0f} MB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--learn", default="intersection", choices=["intersection", "size"])
    ap.add_argument("--replay", action="store_true")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--solo", action="store_true")
    args = ap.parse_args()
    if args.solo:
        return solo(args)
    from atoll.deploy import certs
    ctx, out = mp.get_context("spawn"), {}
    with tempfile.TemporaryDirectory() as d:
        certs.init(d)
        certs.issue(d, "party-a", token=True)
        print(f"n = {args.n} x {args.n}, overlap {args.overlap}, learn {args.learn}, "
              f"{args.workers} worker(s) per party, {os.cpu_count()} cores, "
              f"load average before {os.getloadavg()[0]:.2f}", flush=True)
        rows, wall = live(ctx, d, args, d if args.replay else None)
        out["live"] = rows
        for r in rows:
            print(f"live, party {r['name']}: {_line(r, args)}")
        print(f"live, both parties, process start to last result: {wall:.1f} s; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        for who in ("A", "B") if args.replay else ():
            row, peer = replay_one(ctx, d, args, d, who)
            out[f"replay {who}"] = [row, peer]
            print(f"alone, party {row['name']}: {_line(row, args)}; load average "
                  f"{os.getloadavg()[0]:.2f}")
            print(f"  its replay peer: cpu {peer['cpu']:.1f} s; of the {peer['received']} messages "
                  f"the party sent, {peer['equal']} equal the live run's ({peer['expected']} "
                  f"expected); {peer['sent']} recorded messages sent", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def solo(args):
    import secrets

    from atoll.vertical import psi
    mine = [x.encode() for x in items(args.n, 0)]
    scalar, session, chunk = secrets.token_bytes(32), secrets.token_bytes(32), psi.CHUNK
    engine = psi._Engine(args.workers)
    try:
        engine.map(psi._reblind_task, [(scalar, psi.hash_to_group([b"warm"], session), 0)] * args.workers)
        t0, c0 = time.perf_counter(), psi_replay._cpu()
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
          f"blind the peer's {t2 - t1:.1f} s, total {t2 - t0:.1f} s wall, cpu "
          f"{psi_replay._cpu() - c0:.1f} s; {(t2 - t0) / (2 * args.n) * 1e6:.1f} us per "
          f"exponentiation; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
