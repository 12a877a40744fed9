"""ECDH-PSI between parties over gRPC: one bidirectional ``Exchange`` stream per session.

The listening party::

    server = PsiServer(items, identify, tls={"key": ..., "cert": ..., "ca": ...}, auth="token",
                       learn="intersection", reveal="intersection")
    server.start()                  # each session's Result lands in server.results

The dialing party: ``psi_connect(address, items, ca=..., token=...)`` returns its ``Result``;
``dial(address, ...)`` is the channel ``atoll.vertical.psi.leader_psi`` takes per peer.

TLS, authentication (mutual TLS or bearer tokens), message limits, the one-open-call-per-client
slot and the server-side deadline are those of the deployment server (``GrpcServer``); a message
holds at most ``MAX_CHUNK`` group elements, and ``run_psi`` checks every chunk before keeping it.
A fast peer is held back by gRPC's flow control: a party reads at most ``DEPTH`` messages ahead.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time

import grpc

from atoll.transport.grpc.client import Connection
from atoll.transport.grpc.limits import Limits
from atoll.transport.grpc.messages import build
from atoll.transport.grpc.server import GrpcServer
from atoll.vertical.psi import MAX_CHUNK, POINT, Message, PsiError, Result, run_psi

PACKAGE = "atoll.psi.v1"
SCHEMA = {"PsiMessage": [("kind", "string"), ("session", "bytes"), ("nonce", "bytes"),
                         ("count", "int64"), ("learn", "string"), ("reveal", "string"),
                         ("data", "bytes"), ("version", "string")]}
PsiMessage = build(SCHEMA, PACKAGE)["PsiMessage"]
METHODS = {"Exchange": (PsiMessage, PsiMessage, True, True)}
CHUNK_BYTES = MAX_CHUNK * POINT
DEPTH = 16
FIELDS = [f for f, _ in SCHEMA["PsiMessage"]]


def to_pb(m: Message):
    return PsiMessage(**{f: getattr(m, f) for f in FIELDS})


def from_pb(p) -> Message:
    return Message(**{f: getattr(p, f) for f in FIELDS})


def drain(self):
    """A stream's outgoing messages: ``self.outbox`` until a None, or until ``self.done``."""
    while True:
        try:
            m = self.outbox.get(timeout=0.2)
        except queue.Empty:
            if self.done.is_set():
                return
            continue
        if m is None:
            return
        yield m


class StreamChannel:
    """A ``run_psi`` channel over one gRPC stream: a thread reads the incoming messages into a
    bounded inbox; ``outgoing()`` is the iterator gRPC sends from. ``done``: the call is over;
    ``ended``: the incoming stream ended (``reason`` if it broke).

    Sending never waits: both parties send their whole set before reading the other's, so a send
    blocked on the peer deadlocks both. The outbox holds at most what this party itself computed
    (its values, and the peer's after the count was checked); the inbox is bounded."""

    def __init__(self):
        self.inbox, self.outbox = queue.Queue(DEPTH), queue.Queue()
        self.done, self.ended, self.reason = threading.Event(), threading.Event(), ""

    def start(self, incoming) -> None:
        threading.Thread(target=self._read, args=(incoming,), daemon=True).start()

    def _read(self, incoming) -> None:
        try:
            for p in incoming:
                if not self._put(self.inbox, from_pb(p)):
                    break
        except grpc.RpcError as exc:
            self.reason = f"{exc.code().name}: {exc.details()}" if hasattr(exc, "code") else str(exc)
        except Exception as exc:  # noqa: BLE001 - a dropped stream ends the session with its reason
            self.reason = f"{type(exc).__name__}: {exc}"
        if self.reason:
            self.done.set()
        self.ended.set()

    def _put(self, q: queue.Queue, item) -> bool:
        while not self.done.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def send(self, msg: Message) -> None:
        if self.done.is_set():  # the reason (e.g. UNAUTHENTICATED) when the stream said one
            why = f" ({self.reason})" if self.reason else ""
            raise PsiError(f"the connection closed while this party was sending {msg.kind}{why}",
                           from_peer=True)
        self.outbox.put(to_pb(msg))

    def recv(self, timeout: float) -> Message:
        end = time.monotonic() + timeout
        while True:
            try:
                return self.inbox.get(timeout=min(0.2, timeout))
            except queue.Empty:
                if self.ended.is_set():  # what was read before the end comes first
                    with contextlib.suppress(queue.Empty):
                        return self.inbox.get_nowait()
                    return Message("closed", data=self.reason.encode())
                if time.monotonic() >= end:
                    raise TimeoutError from None

    outgoing = drain

    def close(self) -> None:
        """No more messages from this side (those queued are still sent)."""
        self.outbox.put(None)

    def finish(self, linger: float) -> None:
        """Close, then let the peer end its stream (up to ``linger`` s), discarding what it sends."""
        self.close()
        end = time.monotonic() + linger
        while not self.ended.is_set() and time.monotonic() < end:
            with contextlib.suppress(queue.Empty):
                self.inbox.get(timeout=0.1)
        self.done.set()


class PsiConnection(Connection):
    SERVICE, METHODS = f"{PACKAGE}.Psi", METHODS


@contextlib.contextmanager
def dial(address: str, *, rpc_timeout: float = 3600.0, linger: float = 10.0, **creds):
    """A channel to the PSI party at ``address`` (``creds``: ``Connection``'s ca, cert, key,
    token, insecure); on exit waits up to ``linger`` s for the peer to end the stream."""
    conn, ch = PsiConnection(address, **creds), StreamChannel()
    try:
        ch.start(conn.stubs["Exchange"](ch.outgoing(), metadata=conn.meta, timeout=rpc_timeout))
        yield ch
    finally:
        ch.finish(linger)
        conn.close()


def psi_connect(address: str, items, *, creds: dict | None = None, **psi) -> Result:
    """Run one PSI session with the party listening at ``address``; ``psi``: ``run_psi``'s options."""
    with dial(address, **(creds or {})) as ch:
        return run_psi(ch, items, **psi)


class PsiServer(GrpcServer):
    """The listening party: serves sessions one stream each; ``results``/``errors`` per session
    as (peer name, Result or PsiError). A session may last ``limits.rpc_timeout`` (default 1 h:
    1M x 1M took 288 s on a loaded 2-core machine, past the deployment's 300 s default)."""
    SERVICE, METHODS = f"{PACKAGE}.Psi", METHODS

    def __init__(self, items, identify, *, address: str = "127.0.0.1:0", tls: dict | None = None,
                 auth: str = "token", limits: Limits = Limits(rpc_timeout=3600.0), **psi):
        super().__init__(self, identify, address=address, tls=tls, auth=auth,
                         chunk_bytes=CHUNK_BYTES, limits=limits)
        self.items, self.psi = list(items), psi
        self.results: list[tuple[str, Result]] = []
        self.errors: list[tuple[str, Exception]] = []
        self.finished = threading.Semaphore(0)

    def _exchange(self, request_iterator, context):
        name, cid = self._who(context)
        self.slots.take(context, "Exchange", cid, self.watchdog, self.limits.rpc_timeout)
        ch = StreamChannel()
        context.add_callback(ch.done.set)  # the call is over: a later send fails at once
        ch.start(request_iterator)
        threading.Thread(target=self._session, args=(name, ch), daemon=True).start()
        yield from ch.outgoing()

    def _session(self, name: str, ch: StreamChannel) -> None:
        try:
            self.results.append((name, run_psi(ch, self.items, **self.psi)))
        except Exception as exc:  # noqa: BLE001 - kept for the caller, the server goes on
            self.errors.append((name, exc))
        finally:
            ch.close()
            self.finished.release()

    def wait(self, sessions: int = 1, timeout: float = 120.0) -> None:
        """Block until ``sessions`` more sessions ended (successfully or not)."""
        for _ in range(sessions):
            if not self.finished.acquire(timeout=timeout):
                raise TimeoutError(f"no PSI session ended within {timeout} s")
