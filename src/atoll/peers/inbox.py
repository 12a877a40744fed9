"""What a peer accepts from the wire: its in-neighbours' messages for the current round or one
of the next ``ahead`` rounds (a neighbour that does not wait for this peer may run ahead).

``Inbox.receive`` is the backend of ``transport.grpc.peer.PeerServer``. A message is accepted
only when every check passes, in this order, and a refusal names what was wrong (it is logged
and kept in ``refused``):

1. the sender named in the message is the peer its credentials authenticate;
2. the peer has not finished, and the round is its current one or one of the ``ahead`` next;
3. the sender is an in-neighbour of this peer in that round (from the shared topology);
4. it is the sender's first message for that round;
5. the bytes have exactly this run's layout (entry names, dtypes, shapes, length), checked on
   the header before anything is decoded (``wire.Layout.matches``);
6. every value is finite, and a push-sum weight is positive.

``take(round, expected, timeout)`` waits for the expected senders (at most ``timeout``), closes
the round (a late message for it is refused, so its sender knows it was not counted) and returns
what came.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import torch

from atoll.transport import wire

WEIGHT = "#weight"  # the push-sum weight's entry in a message (state entries never start with #)
log = logging.getLogger("atoll.decentralized")


class Inbox:
    def __init__(self, me: int, in_neighbours: Callable[[int], set[int]], layout: wire.Layout,
                 push: bool, ahead: int = 1, keep: int = 1000):
        self.me, self.in_neighbours, self.layout, self.push = me, in_neighbours, layout, push
        self.ahead = ahead
        self.max_bytes = layout.size
        self.cond, self.current, self.box, self.closed = threading.Condition(), 0, {}, False
        self.refused: deque[tuple[int, int, str]] = deque(maxlen=keep)  # (sender, round, reason)

    def receive(self, peer: int, claimed: int, r: int, data: bytes) -> tuple[bool, str]:
        with self.cond:
            reason = self._admit(peer, claimed, r, data)
        if reason:
            self.refuse(peer, r, reason)
            return False, reason
        return True, ""

    def refuse(self, peer: int, r: int, reason: str) -> None:
        log.warning("peer %d refused a message from peer %d for round %d: %s", self.me, peer, r, reason)
        self.refused.append((peer, r, reason))

    def _admit(self, peer: int, claimed: int, r: int, data: bytes) -> str | None:
        if claimed != peer:
            return f"the message names peer {claimed} as its sender, its credentials are peer {peer}'s"
        if self.closed:
            return f"peer {self.me} has finished its rounds"
        if not self.current <= r <= self.current + self.ahead:
            return (f"round {r}: peer {self.me} is in round {self.current} and accepts rounds "
                    f"{self.current} to {self.current + self.ahead}")
        if peer not in self.in_neighbours(r):
            return f"peer {peer} is not an in-neighbour of peer {self.me} in round {r}"
        if peer in self.box.get(r, {}):
            return f"a second message from peer {peer} for round {r}"
        tree, reason = self._decode(data)
        if reason:
            return reason
        self.box.setdefault(r, {})[peer] = tree
        self.cond.notify_all()
        return None

    def _decode(self, data: bytes):
        if not self.layout.matches(data):
            return None, self._mismatch(data)
        tree = wire.loads(data)
        for name, v in tree.items():
            if not bool(torch.isfinite(v).all()):
                return None, f"entry {name!r} holds NaN or infinite values"
        if self.push and not bool((tree[WEIGHT] > 0).all()):
            return None, f"the push-sum weight {float(tree[WEIGHT])} is not positive"
        return tree, None

    def _mismatch(self, data: bytes) -> str:
        try:
            got = wire.Layout.parse(data)
        except wire.WireError as exc:
            return f"not a valid message: {exc}"
        describe = lambda lay: ", ".join(f"{k} {d} {list(s)}" for k, (d, s, _, _) in  # noqa: E731
                                         lay.entries.items())
        return (f"{len(data)} bytes with entries [{describe(got)}]; this run's messages are "
                f"{self.layout.size} bytes with entries [{describe(self.layout)}]")

    def close(self) -> list[dict]:
        """Refuse everything from now on (the peer is done); returns what was accepted for later
        rounds, in round and sender order."""
        with self.cond:
            self.closed = True
            early = [self.box[r][k] for r in sorted(self.box) for k in sorted(self.box[r])]
            self.box.clear()
            return early

    def take(self, r: int, expected: set[int], timeout: float) -> dict[int, dict]:
        end = time.monotonic() + timeout
        with self.cond:
            self.cond.wait_for(lambda: expected <= set(self.box.get(r, {})),
                               max(0.0, end - time.monotonic()))
            self.current = r + 1
            return self.box.pop(r, {})
