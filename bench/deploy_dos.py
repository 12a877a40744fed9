"""Denial of service on loopback: how long honest clients take to finish their rounds while an
attack runs against `atoll server` (docs/deployment.md, "Denial of service").

The server runs as `atoll server` in a child process limited to ``--fds`` open files (like a
default ``ulimit -n 1024``), with token authentication; two honest clients (threads of this
process) train ``--rounds`` rounds; a third enrolled identity belongs to the attacker, and
``min_fraction`` lets a round close on the two honest updates. Attacks (each bounded in count and
time, everything closed at the end):

* ``none``: no attack (the baseline);
* ``idle``: ``--sockets`` TCP connections that never start TLS, held for the whole run;
* ``polls``: the attacker's token keeps 60 long polls open (re-opens any that ends) and stalls
  the upload of every task it gets;
* ``badauth``: 4 threads send ``Status`` calls with a wrong token as fast as they can.

    PYTHONPATH=src python bench/deploy_dos.py --rounds 3 --limit 60

Prints one JSON line per attack: seconds until both honest clients finished, and server log lines.
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from atoll import config
from atoll.deploy import local
from atoll.deploy.client import Client, credentials
from atoll.transport.grpc import messages as M
from atoll.transport.grpc.client import Connection, TransportError

CONFIG = """
name = "dos"
rounds = {rounds}
[data]
name = "digits"
num_clients = 3
[model]
hidden = [16]
[sampling]
clients_per_round = 3
[deploy]
round_timeout = 30
min_fraction = 0.6
"""
SERVER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["atoll", *sys.argv[2:]]
from atoll.cli import main
sys.exit(main())
"""


def idle(port, stop, n):
    held = []
    for _ in range(n):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    stop.wait(600)
    for s in held:
        s.close()


def polls(port, stop, e):
    """60 long polls of one identity; its task's upload is started and then stalls (so the
    coordinator holds the polls instead of handing the task out again)."""
    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(Path(e["ca"]).read_bytes()))
    stubs = {name: getattr(channel, kind)(f"/{M.SERVICE}/{name}", request_serializer=M.METHODS[name][0].SerializeToString,
                                          response_deserializer=M.METHODS[name][1].FromString)
             for name, kind in (("GetTask", "unary_stream"), ("SubmitUpdate", "stream_unary"))}
    meta = (("authorization", "Bearer " + Path(e["token"]).read_text().strip()),)
    stalled = []

    def stall(head):
        yield M.UpdateChunk(round=head.round, task_id=head.task_id, num_examples=1, data=b"x")
        stop.wait(600)

    def poll():
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                for chunk in stubs["GetTask"](M.TaskRequest(wait_s=60), metadata=meta, timeout=60):
                    if chunk.kind == "TASK":
                        stalled.append(stubs["SubmitUpdate"].future(stall(chunk), metadata=meta))
            except grpc.RpcError:
                time.sleep(0.05)

    threads = [threading.Thread(target=poll, daemon=True) for _ in range(60)]
    for t in threads:
        t.start()
    stop.wait(600)
    for f in stalled:
        f.cancel()
    for t in threads:
        t.join(70)
    channel.close()


def badauth(port, stop, e):
    conn = Connection(f"127.0.0.1:{port}", **credentials(ca=e["ca"], token="atl_" + "x" * 43), timeout=5)
    for _ in range(20000):
        if stop.is_set():
            break
        try:
            conn.status()
        except TransportError:
            pass
    conn.close()


def scenario(tmp: Path, attack: str, args) -> dict:
    (tmp / "exp.toml").write_text(CONFIG.format(rounds=args.rounds))
    enrolled = local.prepare(config.load(tmp / "exp.toml"), tmp, tokens=True)
    log = tmp / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(args.fds), "server", str(tmp / "exp.toml"),
                                   "--port", "0", "--host", "127.0.0.1", "--certs", str(tmp / "certs"),
                                   "--out", str(tmp / "run"), "--no-plots", "--set", "deploy.auth=token",
                                   *args.set], stdout=out, stderr=subprocess.STDOUT)
    stop, threads = threading.Event(), []
    try:
        while not (m := re.search(r"listening on port (\d+)", log.read_text())):
            assert server.poll() is None, log.read_text()
            time.sleep(0.1)
        port = int(m.group(1))
        work = {"idle": lambda: idle(port, stop, args.sockets), "polls": lambda: polls(port, stop, enrolled[2]),
                "badauth": lambda: badauth(port, stop, enrolled[2])}
        n = 4 if attack == "badauth" else 1
        threads = [threading.Thread(target=work[attack], daemon=True) for _ in range(n)] if attack != "none" else []
        for t in threads:
            t.start()
        time.sleep(1.0)  # let the attack take hold
        t0 = time.monotonic()
        clients = [Client(f"127.0.0.1:{port}", e["data"], ca=e["ca"], token=e["token"], backoff=(0.1, 2.0),
                          give_up_s=args.limit) for e in enrolled[:2]]
        honest = [threading.Thread(target=c.run, daemon=True) for c in clients]
        for t in honest:
            t.start()
        for t in honest:
            t.join(max(0.0, args.limit - (time.monotonic() - t0)))
        took = time.monotonic() - t0
        done = all(c.counts["accepted"] == args.rounds for c in clients)
        return {"attack": attack, "finished": done, "seconds": round(took, 1) if done else f">{args.limit}",
                "accepted": [c.counts["accepted"] for c in clients],
                "server_log_lines": len(log.read_text().splitlines())}
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.kill()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fds", type=int, default=1024, help="the server's open-file limit")
    p.add_argument("--sockets", type=int, default=1100)
    p.add_argument("--limit", type=float, default=60.0, help="seconds before giving up on the honest clients")
    p.add_argument("--attacks", default="none,idle,polls,badauth")
    p.add_argument("--set", action="append", default=[], help="extra --set for atoll server")
    args = p.parse_args()
    args.set = [x for kv in args.set for x in ("--set", kv)]
    for i, attack in enumerate(["none", *args.attacks.split(",")]):
        with tempfile.TemporaryDirectory() as tmp:
            result = scenario(Path(tmp), attack, args)
        if i:  # the first run only warms up this process (torch, the model, the codecs)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
