"""Private set intersection by elliptic-curve Diffie-Hellman (ECDH-PSI) over X25519.

Each party hashes its ids into the group (keyed by a session id derived from both parties'
fresh nonces), raises them to a secret scalar from the OS (``secrets``) and sends them; each
raises the other's values to its own scalar, and equal doubly-blinded values H(x)^ab are the
common ids (Meadows 1986; Huberman, Franklin and Hogg 1999). A party learns
``min(its learn, the peer's reveal)`` of "nothing" < "size" < "intersection"; for "size" the
peer's doubly-blinded values come back in a secret random order. ``run_psi(channel, items)`` is
one party (channels: ``QueueChannel.pair()`` in process, ``atoll.transport.grpc.psi`` over gRPC);
``leader_psi`` serves more parties. Semi-honest security; docs/vertical.md.

Group: X25519 (RFC 7748, ``cryptography``); a hash is taken as a raw u-coordinate, a point of
the curve or of its (secure) twist; the clamped scalar, a multiple of 8, clears both cofactors,
so blinding commutes. Values from the peer must be canonical and not of low order.
"""
from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from atoll.vertical import psi_group as group
from atoll.vertical.psi_group import (POINT, PsiError, _blind_task, _Engine, _reblind_task,  # noqa: F401
                                      check_points, encode, exponentiate, first_duplicate,
                                      hash_to_group, member, secret_permutation)

VERSION = "atoll-psi/1"
CHUNK = 4096          # values per message this party sends
MAX_CHUNK = 1 << 14   # values per message this party accepts
MAX_ITEMS = 1 << 24   # largest set a peer may announce (default)
LEARN = ("nothing", "size", "intersection")


@dataclass(frozen=True)
class Message:
    kind: str  # hello, blinded, reblinded, error (from the peer), closed (by the transport)
    session: bytes = b""
    nonce: bytes = b""
    count: int = 0
    learn: str = ""
    reveal: str = ""
    data: bytes = b""
    version: str = ""


@dataclass(frozen=True)
class Result:
    learned: str                     # what this party learned: nothing, size or intersection
    intersection: list | None        # this party's items in the intersection, in its input order
    size: int | None
    peer_count: int                  # the peer's (deduplicated) set size: always revealed
    session: bytes
    bytes_sent: int                  # payload bytes (the group elements)
    bytes_received: int
    seconds: dict = field(default_factory=dict)


class QueueChannel:
    """One end of an in-process channel; ``recv`` returns None once the other end closed."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue):
        self.inbox, self.outbox = inbox, outbox

    @classmethod
    def pair(cls) -> tuple[QueueChannel, QueueChannel]:
        a, b = queue.Queue(), queue.Queue()
        return cls(a, b), cls(b, a)

    def send(self, msg: Message) -> None:
        self.outbox.put(msg)

    def recv(self, timeout: float) -> Message | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    def close(self) -> None:
        self.outbox.put(None)


class _Link:
    """Receives with a timeout, turns a closed or silent peer into a ``PsiError``, counts bytes."""

    def __init__(self, channel, timeout: float):
        self.channel, self.timeout, self.sent, self.received = channel, timeout, 0, 0

    def send(self, msg: Message) -> None:
        self.sent += len(msg.data)
        self.channel.send(msg)

    def recv(self, kind: str, phase: str) -> Message:
        try:
            msg = self.channel.recv(self.timeout)
        except TimeoutError:
            raise PsiError(f"the peer sent nothing for {self.timeout:g} s during {phase} "
                           "(it vanished or stalled)") from None
        if msg is None or msg.kind == "closed":
            why = f": {msg.data.decode(errors='replace')[:300]}" if msg and msg.data else ""
            raise PsiError(f"the connection closed during {phase}{why}", from_peer=True)
        if msg.kind == "error":
            raise PsiError(f"the peer stopped: {msg.data.decode(errors='replace')[:500]}", True)
        if msg.kind != kind:
            raise PsiError(f"expected a {kind} message during {phase}, got {msg.kind[:20]!r}")
        self.received += len(msg.data)
        return msg

    def values(self, kind: str, session: bytes, count: int, phase: str) -> bytes:
        """``count`` values in chunks of ``kind``; each chunk checked before it is kept."""
        buf, n = bytearray(), 0
        while n < count:
            m = self.recv(kind, phase)
            if m.session != session:
                raise PsiError(f"{phase}: a chunk of session {m.session.hex()[:16]} in session "
                               f"{session.hex()[:16]} (a replay from another session?)")
            k, rest = divmod(len(m.data), POINT)
            if rest or not 0 < k <= MAX_CHUNK:
                raise PsiError(f"{phase}: a chunk of {len(m.data)} bytes (a chunk holds 1 to "
                               f"{MAX_CHUNK} whole {POINT}-byte values)")
            if n + k > count:
                raise PsiError(f"{phase}: the peer sends more than the {count} values it announced")
            check_points(m.data, f"{phase}, chunk at value {n}")
            buf += m.data
            n += k
        dup = first_duplicate(bytes(buf))
        if dup is not None:
            raise PsiError(f"{phase}: value {dup} is a duplicate (each value must occur once)")
        return bytes(buf)


def _hello_bytes(m: Message) -> bytes:
    return b"|".join([m.nonce, str(m.count).encode(), m.learn.encode(), m.reveal.encode()])


def _handshake(link: _Link, count: int, learn: str, reveal: str, max_items: int):
    """Exchange hellos; returns (session id, the peer's hello, what this party / the peer learn)."""
    mine = Message("hello", nonce=group.fresh(32), count=count, learn=learn,
                   reveal=reveal, version=VERSION)
    link.send(mine)
    h = link.recv("hello", "the hello")
    if h.version != VERSION:
        raise PsiError(f"the peer speaks {h.version[:40]!r}, this party {VERSION!r}")
    if len(h.nonce) != 32 or h.nonce == mine.nonce:
        raise PsiError("the peer's nonce is not 32 fresh bytes")
    if not 0 <= h.count <= max_items:
        raise PsiError(f"the peer announces {h.count} items; this party accepts 0 to {max_items}")
    if h.learn not in LEARN or h.reveal not in LEARN:
        raise PsiError(f"the peer's learn/reveal {h.learn[:20]!r}/{h.reveal[:20]!r} is not one of {LEARN}")
    session = hashlib.sha256(VERSION.encode() + b"".join(
        sorted([_hello_bytes(mine), _hello_bytes(h)]))).digest()
    i_learn = LEARN[min(LEARN.index(learn), LEARN.index(h.reveal))]
    peer_learns = LEARN[min(LEARN.index(h.learn), LEARN.index(reveal))]
    return session, h, i_learn, peer_learns


def _check_option(name: str, value: str) -> None:
    if value not in LEARN:
        raise ValueError(f"{name} must be one of {LEARN}, got {value!r}")


def run_psi(channel, items, *, learn: str = "intersection", reveal: str = "intersection",
            workers: int = 1, timeout: float = 60.0, max_items: int = MAX_ITEMS,
            chunk: int = CHUNK) -> Result:
    """One party of a two-party ECDH-PSI over ``channel``; returns what this party learned.

    ``learn``/``reveal``: the most this party asks for / gives ("nothing", "size",
    "intersection"). ``timeout``: seconds the peer may stay silent. ``workers`` > 1 spreads the
    exponentiations over that many processes. On any failure the peer is sent an error message
    and a ``PsiError`` names what was wrong.
    """
    _check_option("learn", learn)
    _check_option("reveal", reveal)
    if not 0 < chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be 1 to {MAX_CHUNK} values, got {chunk}")
    engine, t = _Engine(workers), {"start": time.perf_counter()}
    try:
        mine = {}
        for x in items:
            mine.setdefault(encode(x), x)
        return _run(_Link(channel, timeout), engine, mine, learn, reveal, max_items, chunk, t)
    except PsiError as exc:
        if not exc.from_peer:
            with contextlib.suppress(Exception):
                channel.send(Message("error", data=str(exc).encode()[:1000]))
        raise
    finally:
        engine.close()


def _run(link, engine, mine, learn, reveal, max_items, chunk, t) -> Result:
    session, peer, i_learn, peer_learns = _handshake(link, len(mine), learn, reveal, max_items)
    scalar = group.fresh(32)
    perm = _send_blinded(link, engine, list(mine), scalar, session, chunk, t)
    start = time.perf_counter()
    theirs = link.values("blinded", session, peer.count, "the peer's blinded set")
    t["receive"] = time.perf_counter() - start
    twice = b""
    if i_learn != "nothing" or peer_learns != "nothing":
        twice = _reblind(link, engine, theirs, scalar, session, peer_learns, chunk, t)
    if i_learn == "nothing":
        return _result(link, "nothing", None, None, peer.count, session, t)
    start = time.perf_counter()
    back = link.values("reblinded", session, len(perm), "the peer's reblinding of this set")
    t["receive back"], start = time.perf_counter() - start, time.perf_counter()
    hits = member(back, twice)  # position j of ``back`` is this party's id perm[j]
    found = None
    if i_learn == "intersection":
        values = list(mine.values())
        found = [values[i] for i in np.sort(perm[hits]).tolist()]
    t["compare"] = time.perf_counter() - start
    return _result(link, i_learn, found, int(hits.sum()), peer.count, session, t)


def _send_blinded(link, engine, keys, scalar, session, chunk, t) -> np.ndarray:
    """Blind this party's ids in a secret random order and stream them; returns that order
    (value j sent is ``keys[perm[j]]``)."""
    start = time.perf_counter()
    perm = secret_permutation(len(keys))
    order = [keys[i] for i in perm.tolist()]
    tasks = [(scalar, session, order[i:i + chunk], i) for i in range(0, len(order), chunk)]
    for out in engine.map(_blind_task, tasks):
        link.send(Message("blinded", session=session, data=out))
    t["blind"] = time.perf_counter() - start
    return perm


def _reblind(link, engine, theirs, scalar, session, peer_learns, chunk, t) -> bytes:
    """The peer's values raised to this party's scalar, streamed back if the peer learns
    something: in the peer's order for the intersection, in a secret random order for the size."""
    start = time.perf_counter()
    if peer_learns == "size":  # positions must tell the peer nothing
        theirs = np.frombuffer(theirs, f"S{POINT}")[secret_permutation(len(theirs) // POINT)].tobytes()
    twice = bytearray()
    tasks = [(scalar, theirs[i:i + chunk * POINT], i // POINT)
             for i in range(0, len(theirs), chunk * POINT)]
    for out in engine.map(_reblind_task, tasks):
        twice += out
        if peer_learns != "nothing":
            link.send(Message("reblinded", session=session, data=out))
    t["reblind"] = time.perf_counter() - start
    if first_duplicate(bytes(twice)) is not None:
        raise PsiError("the peer's blinded set holds two values that differ by a low-order "
                       "point (the same item twice)")
    return bytes(twice)


def _result(link, learned, found, size, peer_count, session, t) -> Result:
    t["total"] = time.perf_counter() - t.pop("start")
    return Result(learned, found, size, peer_count, session, link.sent, link.received, t)


def intersect(items_a, items_b, *, learn_a="intersection", learn_b="intersection",
              timeout: float = 60.0, **kw) -> tuple[Result, Result]:
    """Both parties in this process (two threads over a ``QueueChannel``): (A's, B's) results."""
    a, b = QueueChannel.pair()
    out: dict = {}

    def party(name, ch, items, learn):
        try:
            out[name] = run_psi(ch, items, learn=learn, timeout=timeout, **kw)
        except Exception as exc:  # noqa: BLE001 - handed to the caller below
            out[name] = exc
        finally:
            ch.close()

    th = threading.Thread(target=party, args=("b", b, items_b, learn_b), daemon=True)
    th.start()
    party("a", a, items_a, learn_a)
    th.join(timeout + 5)
    for name in ("a", "b"):
        if isinstance(out.get(name), Exception):
            raise out[name]
    return out["a"], out["b"]


def leader_psi(items, peers, *, reveal_final: bool = True, **kw) -> list:
    """The intersection of the leader's ``items`` with every peer's set, through the leader.

    ``peers``: per other party, a callable returning a fresh channel to it (a context manager).
    The leader intersects pairwise in turn, narrowing its set (it learns S0 & S1, then
    S0 & S1 & S2, ...; peer i learns the size of the leader's current set). With
    ``reveal_final`` a second pass lets every peer learn the final intersection (a subset of
    its own set), and nothing else. Peers run ``run_psi`` with learn="intersection" once per pass.
    """
    current = list(items)
    for connect in peers:
        with connect() as ch:
            res = run_psi(ch, current, learn="intersection", reveal="nothing", **kw)
        if res.learned != "intersection":
            raise PsiError(f"a peer revealed only {res.learned!r}: the leader needs the intersection")
        current = res.intersection
    if reveal_final:
        for connect in peers:
            with connect() as ch:
                run_psi(ch, current, learn="nothing", reveal="intersection", **kw)
    return current
