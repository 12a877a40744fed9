"""Bench-only: time ONE PSI party with the machine to itself (``bench/psi.py --replay``).

A live run (both parties in their own processes over loopback gRPC) records what each party
sends; each party's secrets come from a fixed stream (``seed``), so run again it sends the same
bytes. The party is then run again, live over gRPC, against a replay peer that sends the
recorded messages of the other party and computes nothing. The replay peer paces itself like a
peer as fast as the party (its k-th message of a kind goes once the party sent its k-th message
of that kind, or all of them), and checks that every message the party sends equals the one it
sent in the live run: then the recorded answers are exactly what the live peer answered to them.

``seed`` replaces ``atoll.vertical.psi_group.fresh`` in the calling process only; it is reached
from this file alone (no atoll option, config key or environment variable leads here).
"""
import collections
import hashlib
import itertools
import resource
import time
from pathlib import Path


def seed(name: str) -> None:
    """This process's PSI secrets (scalar, nonce, secret orders) from SHAKE-256(name, counter)."""
    from atoll.vertical import psi_group
    count = itertools.count()
    psi_group.fresh = lambda n: hashlib.shake_256(f"bench {name} {next(count)}".encode()).digest(n)


class Recorder:
    """A ``run_psi`` channel that keeps every message this party sends; ``close`` (the listening
    party's server closes its channel before it reports the session) writes them to ``path``."""

    def __init__(self, channel, path):
        self.channel, self.path, self.sent = channel, path, []

    def send(self, msg) -> None:
        self.sent.append(msg)
        self.channel.send(msg)

    def recv(self, timeout):
        return self.channel.recv(timeout)

    def close(self) -> None:
        save(self.sent, self.path)
        self.channel.close()


def save(messages, path) -> None:
    from atoll.transport.grpc.psi import to_pb
    with open(path, "wb") as f:
        for m in messages:
            b = to_pb(m).SerializeToString()
            f.write(len(b).to_bytes(4, "little") + b)


def load(path) -> list:
    from atoll.transport.grpc.psi import PsiMessage, from_pb
    data, out, i = Path(path).read_bytes(), [], 0
    while i < len(data):
        k = int.from_bytes(data[i:i + 4], "little")
        out.append(from_pb(PsiMessage.FromString(data[i + 4:i + 4 + k])))
        i += 4 + k
    return out


def replay(channel, script: list, expect: list, timeout: float = 300.0) -> dict:
    """Send ``script`` (the other party's recorded messages) over ``channel``, paced by the
    party's messages, until the party closes; counts those equal to ``expect`` (its recorded ones)."""
    total = collections.Counter(m.kind for m in expect)
    seen, ordinal = collections.Counter(), []
    for m in script:
        ordinal.append(seen[m.kind])
        seen[m.kind] += 1
    got, equal, j = collections.Counter(), 0, 0
    received = 0
    while True:
        while j < len(script) and (got[script[j].kind] > ordinal[j]
                                   or got[script[j].kind] >= total[script[j].kind]):
            channel.send(script[j])
            j += 1
        m = channel.recv(timeout)
        if m is None or m.kind == "closed":
            break
        equal += received < len(expect) and m == expect[received]
        received += 1
        got[m.kind] += 1
    return {"sent": j, "received": received, "equal": equal, "expected": len(expect)}


def server_tls(d) -> dict:
    return {k: (Path(d) / f).read_bytes() for k, f in (("key", "server.key"), ("cert", "server.pem"),
                                                        ("ca", "ca.pem"))}


def identify_token(d):
    from atoll.deploy import certs
    registry = certs.load_registry(d)

    def identify(kind, value):
        name = certs.by_token(registry, value) if kind == "token" else None
        return (name, registry[name]["id"]) if name else None
    return identify


def dial_creds(d) -> dict:
    return {"ca": (Path(d) / "ca.pem").read_bytes(),
            "token": (Path(d) / "clients" / "party-a.token").read_text().strip()}


def _cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def replay_listener(d, script_path, expect_path, port_q, out_q) -> None:
    """The replay peer of party A: listens like party B, answers with B's recorded messages."""
    from atoll.transport.grpc.psi import PsiServer
    script, expect = load(script_path), load(expect_path)

    class ReplayServer(PsiServer):
        def _session(self, name, ch):
            try:
                self.results.append((name, replay(ch, script, expect)))
            except Exception as exc:  # noqa: BLE001 - reported by the bench
                self.errors.append((name, exc))
            finally:
                ch.close()
                self.finished.release()

    server = ReplayServer([], identify_token(d), tls=server_tls(d))
    port_q.put(server.start())
    server.wait(1, timeout=3600)
    server.stop()
    if server.errors:
        raise server.errors[0][1]
    out_q.put({"name": "replay peer", **server.results[0][1], "cpu": _cpu()})


def replay_dialer(d, script_path, expect_path, ready_q, port_q, out_q) -> None:
    """The replay peer of party B: dials like party A, answers with A's recorded messages."""
    from atoll.transport.grpc.psi import dial
    script, expect = load(script_path), load(expect_path)
    ready_q.put(True)
    port = port_q.get(timeout=600)
    t = time.perf_counter()
    with dial(f"localhost:{port}", **dial_creds(d)) as ch:
        stats = replay(ch, script, expect)
    out_q.put({"name": "replay peer", **stats, "cpu": _cpu(), "wall": time.perf_counter() - t})
