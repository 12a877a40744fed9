"""ECDH-PSI over gRPC with TLS on loopback: two parties, three parties, hostile peers on the wire."""
import functools
import random
import time

import pytest

from atoll.deploy import certs
from atoll.transport.grpc.psi import PsiServer, dial, psi_connect
from atoll.vertical.psi import PsiError, leader_psi


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    certs.init(d, hosts=("localhost", "127.0.0.1"))
    token = certs.issue(d, "leader", token=True)["token"]
    tls = {k: (d / f).read_bytes() for k, f in (("key", "server.key"), ("cert", "server.pem"),
                                                  ("ca", "ca.pem"))}
    secret = open(token).read().strip()
    registry = certs.load_registry(d)

    def identify(kind, value):
        name = certs.by_token(registry, value) if kind == "token" else None
        return (name, registry[name]["id"]) if name else None

    return {"tls": tls, "identify": identify, "creds": {"ca": tls["ca"], "token": secret}}


def serve(pki, items, **psi):
    server = PsiServer(items, pki["identify"], tls=pki["tls"], auth="token", timeout=10.0, **psi)
    server.start()
    return server


def sets(seed, n_a, n_b, common):
    rng = random.Random(seed)
    pool = rng.sample(range(10**9), n_a + n_b - common)
    return [f"p{x}" for x in pool[:n_a]], [f"p{x}" for x in pool[n_a - common:]]


def test_two_parties_over_tls_learn_the_intersection(pki):
    a, b = sets(0, 3000, 2000, 700)
    server = serve(pki, b, learn="intersection", reveal="intersection")
    try:
        res = psi_connect(f"localhost:{server.port}", a, creds=pki["creds"], timeout=10.0, chunk=512)
        server.wait(1, timeout=30)
    finally:
        server.stop()
    assert not server.errors
    name, res_b = server.results[0]
    assert name == "leader"
    assert set(res.intersection) == set(a) & set(b) == set(res_b.intersection)
    assert res.size == res_b.size == 700 and res.peer_count == 2000 and res_b.peer_count == 3000
    assert res.session == res_b.session
    # 32 bytes per own item out, 32 per peer item back (both learn)
    assert res.bytes_sent == 32 * (3000 + 2000) and res.bytes_received == 32 * (2000 + 3000)


def test_size_only_over_tls(pki):
    a, b = sets(1, 500, 800, 123)
    server = serve(pki, b, learn="nothing", reveal="size")
    try:
        res = psi_connect(f"localhost:{server.port}", a, creds=pki["creds"], timeout=10.0)
        server.wait(1, timeout=30)
    finally:
        server.stop()
    res_b = server.results[0][1]
    assert res.learned == "size" and res.size == 123 and res.intersection is None
    assert res_b.learned == "nothing" and res_b.size is None and res_b.intersection is None


def test_three_parties_through_a_leader(pki):
    rng = random.Random(2)
    universe = [f"u{i}" for i in range(3000)]
    s0, s1, s2 = (rng.sample(universe, 1500) for _ in range(3))
    servers = [serve(pki, s, learn="intersection", reveal="intersection") for s in (s1, s2)]
    try:
        peers = [functools.partial(dial, f"localhost:{s.port}", **pki["creds"]) for s in servers]
        final = leader_psi(s0, peers, timeout=10.0)
        for s in servers:
            s.wait(2, timeout=30)
    finally:
        for s in servers:
            s.stop()
    want = set(s0) & set(s1) & set(s2)
    assert set(final) == want and len(want) > 50
    for s in servers:
        assert not s.errors
        first, second = (r for _, r in s.results)
        assert first.learned == "nothing" and first.intersection is None   # narrowing pass
        assert set(second.intersection) == want                              # the final set only
    # the second peer saw the leader's narrowed set (S0 & S1) in the first pass, not S0
    assert servers[1].results[0][1].peer_count == len(set(s0) & set(s1))


def test_unauthenticated_dialer_is_refused(pki):
    server = serve(pki, ["x"])
    try:
        with pytest.raises(PsiError, match="UNAUTHENTICATED"):
            psi_connect(f"localhost:{server.port}", ["x"], timeout=5.0,
                        creds={"ca": pki["creds"]["ca"], "token": "atl_wrong"})
    finally:
        server.stop()
    assert server.results == []


def _hostile_dial(pki, server, *messages, vanish=True):
    """Dial, send a hello and ``messages`` by hand, then drop the stream."""
    from atoll.vertical.psi import VERSION, Message
    with dial(f"localhost:{server.port}", linger=2.0, **pki["creds"]) as ch:
        ch.send(Message("hello", nonce=b"\x07" * 32, count=100, learn="size", reveal="size",
                        version=VERSION))
        assert ch.recv(5).kind == "hello"
        for m in messages:
            ch.send(m)
        while not vanish:  # what the server says last
            m = ch.recv(5)
            if m.kind in ("closed", "error"):
                return m
    return None


def test_dialer_vanishes_mid_protocol(pki):
    from atoll.vertical.psi import Message
    server = serve(pki, ["a", "b"])
    try:
        start = time.monotonic()
        told = _hostile_dial(pki, server, Message("blinded", session=b"?" * 32, data=b""), vanish=False)
        _hostile_dial(pki, server)  # hello, then gone
        server.wait(2, timeout=20)
    finally:
        server.stop()
    assert time.monotonic() - start < 15
    errors = [str(e) for _, e in server.errors]
    assert "a replay from another session?" in errors[0]
    assert told.kind == "error" and b"a replay from another session?" in told.data  # the dialer is told
    assert "the connection closed during the peer's blinded set" in errors[1]


def test_message_over_the_transport_limit_is_cut_off(pki):
    from atoll.vertical.psi import Message
    server = serve(pki, ["a"])
    try:
        reply = _hostile_dial(pki, server, Message("blinded", data=b"\x01" * (1 << 20)), vanish=False)
        server.wait(1, timeout=20)
    finally:
        server.stop()
    assert reply.kind == "closed" and b"RESOURCE_EXHAUSTED" in reply.data
    assert "the connection closed during the peer's blinded set" in str(server.errors[0][1])


def test_listener_vanishes_mid_protocol(pki):
    import threading
    server = serve(pki, [f"b{k}" for k in range(30000)])
    out = {}

    def run():
        try:
            psi_connect(f"localhost:{server.port}", [f"a{k}" for k in range(30000)],
                        creds=pki["creds"], timeout=10.0)
        except PsiError as exc:
            out["error"] = str(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    time.sleep(0.5)
    start = time.monotonic()
    server.stop(grace=0)
    th.join(15)
    assert not th.is_alive() and time.monotonic() - start < 12
    assert out["error"].startswith("the connection closed"), out  # while sending or receiving


def test_sending_never_waits_for_the_peer_to_read():
    """Both parties send their whole set before they read the peer's, so a send that blocks on a
    full buffer deadlocks both once the sets outgrow gRPC's windows (found at 1M x 1M: both
    parties idle after 10 s). Only the inbox is bounded: a peer cannot flood this party."""
    import threading

    from atoll.transport.grpc.psi import DEPTH, StreamChannel
    from atoll.vertical.psi import Message
    ch = StreamChannel()  # nobody drains outgoing(): the peer is busy sending too
    sent = threading.Event()

    def flood():
        for _ in range(10 * DEPTH):
            ch.send(Message("blinded", data=b"\x09" * 32))
        sent.set()

    threading.Thread(target=flood, daemon=True).start()
    assert sent.wait(5), "send blocked while the peer was not reading"
    assert ch.inbox.maxsize == DEPTH
    ch.done.set()
