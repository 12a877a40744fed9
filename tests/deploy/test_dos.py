"""Denial of service: each attack runs (loopback, bounded in count and time) while honest clients
join and finish rounds. Figures and commands: docs/deployment.md, "Denial of service"."""
import json
import logging
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from atoll.deploy import certs, local
from atoll.deploy.client import Client, credentials
from atoll.deploy.server import Server
from atoll.transport.grpc import messages as M
from atoll.transport.grpc.client import Connection, TransportError
from atoll.transport.grpc.limits import Limits, RateLog
from atoll.transport.grpc.server import GrpcServer

from .conftest import ServerThread, env, small_config, wait_for


def honest_clients(enrolled, port, poll_s=2.0):
    clients = [Client(f"127.0.0.1:{port}", e["data"], ca=e["ca"], token=e.get("token"), cert=e.get("cert"),
                      key=e.get("key"), backoff=(0.1, 0.5), poll_s=poll_s, give_up_s=60) for e in enrolled]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    return clients, threads


def serve(tmp_path, *, clients=4, rounds=2, timeout=30.0, start=True, **deploy):
    """An in-process token-auth server; ``start=False``: gRPC only (no rounds: long polls wait)."""
    cfg = small_config(tmp_path, rounds=rounds, clients=clients, timeout=timeout)
    cfg = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update=deploy)})
    enrolled = local.prepare(cfg, tmp_path, tokens=True)
    s = Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="127.0.0.1", port=0,
               auth="token", plots=False, linger_s=0)
    if not start:
        s.grpc.start()
    return s, enrolled


def connect(s, e, **kw):
    return Connection(f"127.0.0.1:{s.port}", **credentials(ca=e["ca"], token=e["token"]), **kw)


def raw_stub(s, e, method, options=()):
    """A bare gRPC stub of ``method`` for an attacker who holds enrolled client ``e``'s token."""
    creds = grpc.ssl_channel_credentials(open(e["ca"], "rb").read())
    channel = grpc.secure_channel(f"127.0.0.1:{s.port}", creds, options=list(options))
    req, rep, cs, ss = M.METHODS[method]
    kind = {(False, True): channel.unary_stream, (True, False): channel.stream_unary}[(cs, ss)]
    meta = (("authorization", "Bearer " + open(e["token"]).read().strip()),)
    return channel, kind(f"/{M.SERVICE}/{method}", request_serializer=req.SerializeToString,
                         response_deserializer=rep.FromString), meta


SERVER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["atoll", *sys.argv[2:]]
from atoll.cli import main
sys.exit(main())
"""


def limited_server(tmp_path, fds, *args):
    """``atoll server`` in a process that may open at most ``fds`` files (like ulimit -n)."""
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-c", SERVER, str(fds), "server", tmp_path / "exp.toml",
                              "--port", "0", "--host", "127.0.0.1", "--certs", tmp_path / "certs",
                              "--out", tmp_path / "run", "--no-plots", *args], env=env(), stdout=out,
                             stderr=subprocess.STDOUT)
    port = wait_for(lambda: re.search(r"listening on port (\d+)", log.read_text()), 30, "the server")
    return p, int(port.group(1))


def test_idle_connections_are_dropped_at_the_handshake_timeout(tmp_path):
    """The connection cap full of idle sockets: honest clients get in once the handshake times out."""
    s, enrolled = serve(tmp_path, clients=2, rounds=1, handshake_timeout=1.0, max_connections=50)
    held = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(60)]
    try:
        thread = ServerThread(s)
        clients, threads = honest_clients(enrolled, s.port)
        thread.join(30)
        for t in threads:
            t.join(10)
        assert [c.counts["accepted"] for c in clients] == [1, 1]
        first = sorted(c.first_task_s for c in clients)
        assert 1.0 < first[0] and first[1] < 5, first  # the handshake timeout (1 s), not 120 s
        assert all(h.recv(1) == b"" for h in held[:50])  # the server closed the idle sockets
    finally:
        for h in held:
            h.close()


@pytest.mark.slow
@pytest.mark.parametrize("fds,sockets,rounds", [(128, 150, 1), (256, 1100, 3)])
def test_idle_tcp_connections_do_not_lock_clients_out(tmp_path, fds, sockets, rounds):
    """Before: the idle sockets held every descriptor for 120 s (no client joined within 40 s)."""
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > sockets + 100, "raise ulimit -n"
    cfg = small_config(tmp_path, rounds=rounds, clients=2)
    enrolled = local.prepare(cfg, tmp_path)  # mutual TLS
    server, port = limited_server(tmp_path, fds, "--set", "deploy.handshake_timeout=1")
    held = []
    try:
        for _ in range(sockets):  # connect and send nothing: no TLS handshake ever starts
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        t0 = time.monotonic()
        clients, threads = honest_clients(enrolled, port)
        assert server.wait(30) == 0, (tmp_path / "server.log").read_text()[-2000:]
        took = time.monotonic() - t0
        for t in threads:
            t.join(10)
        assert [c.counts["accepted"] for c in clients] == [rounds, rounds]
        assert took < 20, took  # handshake timeout (1 s) + reconnect back-off + the rounds
        print(f"{sockets} idle sockets, {fds} fds: {rounds} rounds finished in {took:.1f} s")
    finally:
        for s in held:
            s.close()
        if server.poll() is None:
            server.kill()
            server.wait()


def test_one_client_holds_one_long_poll(tmp_path):
    """Before: 60 long polls of one client took all 20 threads; an honest Join waited 10 s."""
    s, enrolled = serve(tmp_path, start=False, poll_s=10.0)
    channel, stub, meta = raw_stub(s, enrolled[0], "GetTask")
    try:
        calls = [stub(M.TaskRequest(wait_s=10), metadata=meta, timeout=15) for _ in range(60)]
        ended = wait_for(lambda: [c for c in calls if c.done()] if sum(c.done() for c in calls) >= 59
                         else None, 5, "59 of the 60 polls to end")
        assert len(ended) == 59  # one poll is held, 59 refused at once
        assert {c.code() for c in ended} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        t0 = time.monotonic()
        honest = connect(s, enrolled[1], timeout=5)
        assert honest.join()["client_id"] == 1 and time.monotonic() - t0 < 1.0
        honest.close()
    finally:
        channel.close()
        s.grpc.stop(0)


def test_max_rpcs_refuses_at_once_instead_of_queueing(tmp_path):
    s, enrolled = serve(tmp_path, start=False, poll_s=10.0, max_rpcs=4)
    conns = [connect(s, e, timeout=15) for e in enrolled]
    pool = futures.ThreadPoolExecutor(4)
    try:
        polls = [pool.submit(c.get_task, 10) for c in conns]  # 4 honest long polls: all 4 calls
        wait_for(lambda: len(s.coordinator.last_seen) == 4, 5, "4 open polls")
        t0 = time.monotonic()
        with pytest.raises(TransportError) as e:
            connect(s, enrolled[0], timeout=15).join()
        assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retryable
        assert time.monotonic() - t0 < 1.0  # refused, not queued behind the 10 s polls
    finally:
        s.grpc.stop(0)
        for f in polls:
            f.exception(15)
        pool.shutdown()


def test_a_stalled_upload_is_cut_at_the_server_deadline(tmp_path):
    """Before: an upload that stalls after its first chunk held its thread until the client quit."""
    s, enrolled = serve(tmp_path, clients=3, rounds=1, timeout=3.0, rpc_timeout=1.0, poll_s=0.5)
    thread = ServerThread(s)
    attacker = connect(s, enrolled[0], timeout=10)
    attacker.join()
    task = attacker.get_task(5)
    channel, submit, meta = raw_stub(s, enrolled[0], "SubmitUpdate")
    stop = threading.Event()

    def slow():
        yield M.UpdateChunk(round=task.round, task_id=task.task_id, num_examples=1, data=b"x")
        stop.wait(20)  # the attacker's upload stalls (bounded: 20 s)

    try:
        clients, threads = honest_clients(enrolled[1:], s.port, poll_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:  # no client deadline at all
            submit(slow(), metadata=meta)
        assert e.value.code() == grpc.StatusCode.CANCELLED and 0.9 < time.monotonic() - t0 < 3
        thread.join(20)
        for t in threads:
            t.join(10)
        assert [c.counts["accepted"] for c in clients] == [1, 1]
        line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
        assert (line["clients_sampled"], line["clients_succeeded"]) == (3, 2)
        assert not s.grpc.slots.open and s.grpc.watchdog.cancelled == 1
    finally:
        stop.set()
        channel.close()
        attacker.close()


def test_a_call_whose_request_never_comes_is_cut(tmp_path):
    """A unary call whose message never arrives never reaches a handler (no Watchdog, no
    authentication): the connection's maximum age and grace (3 x rpc_timeout) end it. Before: held
    forever."""
    s, enrolled = serve(tmp_path, start=False, max_rpcs=4, rpc_timeout=1.0, poll_s=0.5)
    creds = grpc.ssl_channel_credentials(open(enrolled[0]["ca"], "rb").read())
    channel = grpc.secure_channel(f"127.0.0.1:{s.port}", creds)
    join = channel.stream_unary(f"/{M.SERVICE}/Join", request_serializer=M.JoinRequest.SerializeToString,
                                response_deserializer=M.JoinReply.FromString)
    stop = threading.Event()

    def never():
        stop.wait(30)  # bounded: 30 s
        yield from ()

    t0 = time.monotonic()
    hung = [join.future(never()) for _ in range(6)]  # no token needed: nothing is checked yet
    honest = connect(s, enrolled[1], timeout=5)
    try:
        wait_for(lambda: sum(f.done() for f in hung) == 2, 5, "2 calls over max_rpcs to be refused")
        with pytest.raises(TransportError) as e:
            honest.join()
        assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retryable
        wait_for(lambda: all(f.done() for f in hung), 6, "the hung calls to be cut")
        assert 2.5 < time.monotonic() - t0 < 4.5  # 3 x rpc_timeout (+ gRPC's jitter of the age)
        assert sorted(f.exception().code().name for f in hung).count("UNAVAILABLE") == 4
        assert honest.join()["client_id"] == 1
    finally:
        stop.set()
        channel.close()
        honest.close()
        s.grpc.stop(0)


class SlowBackend:
    def next_task(self, cid, wait_s, held=None):
        time.sleep(3)  # a task download that does not move
        return ("WAIT",)


def test_a_task_stream_is_cut_at_the_server_deadline():
    server = GrpcServer(SlowBackend(), lambda kind, value: ("x", 0), address="127.0.0.1:0", auth="token",
                        limits=Limits(rpc_timeout=1.0))
    port = server.start()
    conn = Connection(f"127.0.0.1:{port}", token="t", insecure=True, timeout=30)
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError) as e:
            conn.get_task(10)
        assert e.value.code == "CANCELLED" and time.monotonic() - t0 < 2.5
        wait_for(lambda: not server.slots.open, 5, "the slot to be released")
        assert server.watchdog.cancelled == 1
    finally:
        conn.close()
        server.stop(0)


def test_rpc_timeout_must_exceed_poll_s(tmp_path):
    with pytest.raises(ValueError, match="rpc_timeout"):
        serve(tmp_path, start=False, poll_s=10.0, rpc_timeout=5.0)


def test_ping_flood_is_cut_off(tmp_path):
    s, enrolled = serve(tmp_path, start=False, poll_s=10.0)
    flood = [("grpc.keepalive_time_ms", 50), ("grpc.keepalive_permit_without_calls", 1),
             ("grpc.http2.max_pings_without_data", 0)]
    channel, stub, meta = raw_stub(s, enrolled[0], "GetTask", flood)
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            next(stub(M.TaskRequest(wait_s=10), metadata=meta, timeout=15))
        # cut off before the 10 s poll ends (gRPC throttles, then GOAWAY after 2 strikes)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 8
        assert "ping" in e.value.details().lower(), e.value.details()
        honest = connect(s, enrolled[1], timeout=5)
        assert honest.join()["client_id"] == 1  # the honest client is unaffected
        honest.close()
    finally:
        channel.close()
        s.grpc.stop(0)


def test_failed_auth_log_lines_are_bounded(tmp_path, caplog):
    """Before: one warning line per refused call (500 calls, 500 lines)."""
    s, enrolled = serve(tmp_path, start=False)
    bad = Connection(f"127.0.0.1:{s.port}", **credentials(ca=enrolled[0]["ca"], token="atl_" + "x" * 43),
                     timeout=5)
    try:
        with caplog.at_level(logging.WARNING, logger="atoll.deploy"):
            for _ in range(500):
                with pytest.raises(TransportError) as e:
                    bad.status()
                assert e.value.code == "UNAUTHENTICATED"
        lines = [r for r in caplog.records if "refused a call" in r.getMessage()]
        assert len(lines) == 10  # deploy.auth_log_per_min
    finally:
        bad.close()
        s.grpc.stop(0)


def test_revoked_client_is_not_sampled(tmp_path):
    """Before: every round sampled the revoked client and waited round_timeout (30 s) for it."""
    s, enrolled = serve(tmp_path, clients=3, rounds=2, timeout=30.0)
    certs.revoke(tmp_path / "certs", "client-2")
    thread = ServerThread(s)
    t0 = time.monotonic()
    clients, threads = honest_clients(enrolled[:2], s.port)
    thread.join(25)
    for t in threads:
        t.join(10)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["clients_sampled"], m["clients_succeeded"]) for m in lines] == [(2, 2), (2, 2)]
    assert time.monotonic() - t0 < 20 and all(c.counts["accepted"] == 2 for c in clients)


def test_rounds_wait_while_nobody_is_enrolled(tmp_path):
    s, enrolled = serve(tmp_path, clients=2, rounds=2, timeout=30.0)
    for e in enrolled:
        certs.revoke(tmp_path / "certs", e["name"])
    thread = ServerThread(s)
    time.sleep(1.5)
    assert s.coordinator.current is None and s.coordinator.state.round == 0  # no round burnt
    s.stop()
    thread.join(10)
    assert thread.final is None


def test_rate_log_counts_what_it_skips(caplog):
    rl = RateLog(logging.getLogger("atoll.deploy"), per_min=3)
    with caplog.at_level(logging.WARNING, logger="atoll.deploy"):
        for i in range(10):
            rl.warn("refused %d", i)
        rl.window -= 61  # a minute later
        rl.warn("refused %d", 10)
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0", "refused 1", "refused 2", "7 more refused calls in the last minute (not logged)",
        "refused 10"]
