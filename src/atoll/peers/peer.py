"""One peer of decentralized training over gRPC: its own state, its neighbours, no server.

A round ``r``: optional local work (``local(r, state, weight)``, e.g. D-PSGD's SGD steps), then
one exchange over the round's mixing matrix ``M = topology(r)`` (the functions of
``atoll.decentralized``, so every peer derives the same graph):

- gossip (``push=False``, ``M`` doubly stochastic): send the state to every out-neighbour, then
  ``x_i <- M_ii x_i + sum_k M_ik x_k`` over the in-neighbours ``k``;
- push-sum (``push=True``, ``M`` column-stochastic): send ``M_ji (x_i, w_i)`` to each
  out-neighbour ``j`` (the sender splits its mass), then ``(x_i, w_i) <- M_ii (x_i, w_i) + sum of
  what came``; the estimate is ``x_i / w_i``.

Failures: a round waits at most ``round_timeout`` (sends and receipts together), then goes on;
it does not wait for an in-neighbour that did not take its own message this round (gone, or
already past the round).
Gossip gives the weight ``M_ik`` of an in-neighbour that did not deliver to the peer itself (the
round's row stays stochastic: the edge is treated as absent for that round). Push-sum keeps the
share ``M_ji (x_i, w_i)`` that out-neighbour ``j`` did not accept (unreachable, refused, or too
late: a closed round refuses), so the total mass ``sum x, sum w`` of the live peers is conserved
and ``x / w`` still converges to one value: the average of the mass still held. A peer that
stops keeps (and reports) the mass it had accepted for rounds it will not run.

``byzantine = b`` (gossip only): ClippedGossip against b lying in-neighbours
(``decentralized.clipped``), over the in-neighbours heard this round.

Restarts: ``run(..., checkpoint=path)`` saves the state after each round; a peer restarted with
the file goes on from the next round. Its neighbours went on without it meanwhile (they do not
wait for a peer that does not take their messages); until it has caught up with them, its
messages are for rounds they closed, so it keeps its own value for those rounds.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from atoll import decentralized as D
from atoll.deploy import certs
from atoll.peers.inbox import WEIGHT, Inbox
from atoll.transport import wire
from atoll.transport.grpc.limits import Limits
from atoll.transport.grpc.peer import PeerChannel, PeerServer, TransportError

Topology = Callable[[int], torch.Tensor]
ROUND = "#round"  # a checkpoint's entry: the rounds done (state entries never start with #)
log = logging.getLogger("atoll.decentralized")


class Peer:
    """Peer ``me`` of ``n``. ``creds``: ``ca``, ``cert``/``key`` (its TLS server certificate),
    ``registry`` (the enrolments, ``deploy.certs``), and ``token`` (``auth="token"``) or
    ``client_cert``/``client_key`` (``auth="mtls"``)."""

    def __init__(self, me: int, n: int, topology: Topology, state: dict[str, torch.Tensor], *,
                 creds: dict, push: bool = False, auth: str = "token", round_timeout: float = 10.0,
                 address: str = "127.0.0.1:0", chunk_bytes: int = 1 << 20, limits: Limits | None = None,
                 ahead: int | None = None, byzantine: int | None = None):
        if any(k.startswith("#") for k in state):
            raise ValueError("state entry names must not start with '#' (reserved for the wire)")
        if byzantine is not None and (push or not isinstance(byzantine, int) or byzantine < 0):
            raise ValueError(f"byzantine (ClippedGossip) must be an integer >= 0, with gossip only; "
                             f"got {byzantine!r}{' with push-sum' if push else ''}")
        self.me, self.n, self.topology, self.push = me, n, topology, push
        self.byzantine = byzantine
        self.state = {k: v.detach().clone() for k, v in state.items()}
        dtype = next(iter(self.state.values())).dtype
        self.weight = torch.ones((), dtype=dtype)
        self.round_timeout, self.creds, self.auth = round_timeout, creds, auth
        self.layout = wire.Layout.of(self._message(1.0 if push else None))
        # how far a neighbour may run ahead: along a static strongly connected graph less than n
        # rounds, on the exponential graph less than n x log2(n)
        ahead = ahead if ahead is not None else n * max(1, math.ceil(math.log2(max(n, 2))))
        self.inbox = Inbox(me, self.in_neighbours, self.layout, push, ahead=ahead)
        self.channels: dict[int, PeerChannel] = {}
        self.pool = ThreadPoolExecutor(max_workers=max(1, n - 1), thread_name_prefix=f"peer{me}")
        self.sent: list[int] = []     # bytes sent per round (wire messages)
        self.missing: list[set] = []  # in-neighbours not heard from, per round
        self.undelivered: list[tuple[int, int, str]] = []  # (out-neighbour, round, why)
        self.seconds: list[float] = []  # wall time of each exchange
        self.resumed_at = 0  # the first round run (after a checkpoint's)
        self.matrix = functools.lru_cache(maxsize=4)(lambda r: self.topology(r).to(torch.float64))
        self.chunk = chunk_bytes
        self.limits = limits or Limits(handshake_timeout=5.0, rpc_timeout=max(30.0, 2 * round_timeout),
                                       max_rpcs=2 * n + 8)
        tls = {"ca": creds["ca"], "cert": creds["cert"], "key": creds["key"]}
        self.server = PeerServer(self.inbox, self._identify, address=address, tls=tls, auth=auth,
                                 chunk_bytes=chunk_bytes, limits=self.limits)

    # ---- the graph -------------------------------------------------------------------------------
    def in_neighbours(self, r: int) -> set[int]:
        row = self.matrix(r)[self.me]
        return {k for k in range(self.n) if k != self.me and float(row[k]) != 0.0}

    def out_neighbours(self, r: int) -> list[int]:
        col = self.matrix(r)[:, self.me]
        return [j for j in range(self.n) if j != self.me and float(col[j]) != 0.0]

    # ---- lifetime --------------------------------------------------------------------------------
    def start(self) -> int:
        return self.server.start()

    def connect(self, addresses: dict[int, str]) -> None:
        """Channels to the peers at ``addresses`` (peer id -> host:port)."""
        c = self.creds
        mine = ({"token": c["token"]} if self.auth == "token"
                else {"cert": c["client_cert"], "key": c["client_key"]})
        for j, address in addresses.items():
            if j != self.me:
                self.channels[j] = PeerChannel(address, ca=c["ca"], chunk_bytes=self.chunk,
                                               timeout=self.round_timeout, **mine)

    def stop(self) -> None:
        self.server.stop(grace=0.2)
        for ch in self.channels.values():
            ch.close()
        self.pool.shutdown(wait=True)

    def run(self, rounds: int, local=None, checkpoint=None) -> dict[str, torch.Tensor]:
        """``rounds`` rounds; returns the estimate (``state / weight`` for push-sum). With
        ``checkpoint`` (a file path) the state is saved there after every round, and a peer that
        restarts with the file there goes on from the round after the saved one."""
        if checkpoint is not None and self.push:  # mass in flight at a crash would count twice
            raise ValueError("checkpoint: push-sum peers cannot resume (the mass they had sent in "
                             "the round of the crash would be kept and delivered both)")
        path = Path(checkpoint) if checkpoint is not None else None
        self.resumed_at = self._resume(path, rounds) if path is not None and path.exists() else 0
        try:
            for r in range(self.resumed_at, rounds):
                if local is not None:
                    self.state = local(r, self.state, self.weight)
                self.exchange(r)
                if path is not None:
                    self._save(path, r + 1)
        finally:
            early = self.inbox.close()  # accepted for rounds this peer will not run
            if self.push and early:  # push-sum: that mass is this peer's now (none is lost)
                self.weight = _mix(1.0, self.weight, [g[WEIGHT] for g in early])
                self.state = {k: _mix(1.0, v, [g[k] for g in early]) for k, v in self.state.items()}
        return self.value()

    def _save(self, path: Path, done: int) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(wire.dumps(self._saved(done)))
        os.replace(tmp, path)  # a crash mid-write leaves the previous round's file

    def _saved(self, done: int) -> dict[str, torch.Tensor]:
        return {**self.state, WEIGHT: self.weight, ROUND: torch.tensor(done, dtype=torch.int64)}

    def _resume(self, path: Path, rounds: int) -> int:
        """The round to go on from; the file is checked (size, then this peer's exact layout,
        then finite values, a positive weight and a round in range) before its values are used."""
        layout = wire.Layout.of(self._saved(0))
        if path.stat().st_size != layout.size:
            raise ValueError(f"checkpoint {path}: {path.stat().st_size} bytes, this peer's state "
                             f"takes {layout.size}: not this run's peer")
        data = path.read_bytes()
        if not layout.matches(data):
            raise ValueError(f"checkpoint {path}: entries, dtypes or shapes differ from this peer's state")
        tree = wire.loads(data)
        done, weight = int(tree.pop(ROUND)), tree.pop(WEIGHT)
        if not all(bool(torch.isfinite(v).all()) for v in tree.values()) or not float(weight) > 0:
            raise ValueError(f"checkpoint {path}: a value is not finite or the weight is not positive")
        if not 0 <= done <= rounds:
            raise ValueError(f"checkpoint {path}: round {done} is outside 0..{rounds}")
        self.state, self.weight = tree, weight
        log.info("peer %d: resumed from %s after round %d", self.me, path, done)
        return done

    def value(self) -> dict[str, torch.Tensor]:
        return {k: v / self.weight for k, v in self.state.items()} if self.push else dict(self.state)

    # ---- one exchange ----------------------------------------------------------------------------
    def exchange(self, r: int) -> None:
        m = self.matrix(r)
        me, start = self.me, time.monotonic()
        end, outs = start + self.round_timeout, self.out_neighbours(r)
        shares = {j: float(m[j, me]) for j in outs}
        if self.push:  # each out-neighbour gets its share; gossip sends the one state to all
            data = {j: wire.dumps(self._message(shares[j])) for j in outs}
        else:
            data = dict.fromkeys(outs, wire.dumps(self._message(None)))
        sends = {j: self.pool.submit(self._send, j, r, data[j], end) for j in outs}
        delivered = {j for j, f in sends.items() if f.result()}
        self.sent.append(sum(len(data[j]) for j in outs))
        # no wait for a neighbour that did not take this round's message: it is gone, or past
        # this round (then what it sent for it is here already)
        expected = self.in_neighbours(r)
        got = self.inbox.take(r, expected - (set(outs) - delivered), max(0.0, end - time.monotonic()))
        self.missing.append(expected - set(got))
        self.seconds.append(time.monotonic() - start)
        if self.push:
            kept = float(m[me, me]) + sum(shares[j] for j in outs if j not in delivered)
            self.weight = _mix(kept, self.weight, [g[WEIGHT] for _, g in sorted(got.items())])
            self.state = {name: _mix(kept, v, [g[name] for _, g in sorted(got.items())])
                          for name, v in self.state.items()}
        else:
            heard = sorted(got)
            w = torch.tensor([float(m[me, k]) for k in heard], dtype=torch.float64)
            own = float(m[me, me]) + sum(float(m[me, k]) for k in expected - set(got))
            if self.byzantine is not None and heard:  # ClippedGossip: as decentralized.clipped
                rows = {name: torch.stack([got[k][name] for k in heard]) for name in self.state}
                s = D.clip_factors(D.distances(rows, self.state), self.byzantine)
                own, w = own + float((w * (1 - s)).sum()), w * s
            self.state = {name: _mix(own, v, [float(wk) * got[k][name] for wk, k in zip(w, heard)])
                          for name, v in self.state.items()}

    def _message(self, share: float | None) -> dict[str, torch.Tensor]:
        if share is None:
            return self.state
        return {**{k: share * v for k, v in self.state.items()}, WEIGHT: share * self.weight}

    def _send(self, j: int, r: int, data: bytes, end: float) -> bool:
        left = end - time.monotonic()
        if j not in self.channels or left <= 0:
            reason, accepted = ("no channel to it" if left > 0 else "round timeout"), False
        else:
            try:
                accepted, reason = self.channels[j].send(self.me, r, data, timeout=left)
            except TransportError as exc:
                reason, accepted = str(exc), False
        if not accepted:
            log.warning("peer %d: peer %d did not take the round %d message: %s", self.me, j, r, reason)
            self.undelivered.append((j, r, reason))
        return accepted

    def _identify(self, kind: str, value):
        reg = self.creds["registry"]
        name = certs.by_certificate(reg, value) if kind == "cert" else certs.by_token(reg, value)
        pid = reg[name]["id"] if name is not None else None
        return (name, pid) if pid is not None and 0 <= pid < self.n else None


def _mix(own: float, mine: torch.Tensor, received: list[torch.Tensor]) -> torch.Tensor:
    out = own * mine
    for x in received:
        out = out + x
    return out
