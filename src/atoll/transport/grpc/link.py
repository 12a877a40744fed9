"""One end of a bidirectional gRPC stream used in lockstep (a request, then its reply).

A thread reads the incoming messages into a bounded inbox (gRPC's flow control holds a flooding
peer back); ``outgoing()`` is the iterator gRPC sends from. ``recv`` returns the next message or
raises ``PartyError`` when the stream ended (the peer closed it or it broke: the reason is named)
or the peer stayed silent past ``timeout``.
"""
from __future__ import annotations

import queue
import time

import grpc

from atoll.transport.grpc.psi import StreamChannel
from atoll.vertical.channel import PartyError

DEPTH = 4


class Link(StreamChannel):
    """PSI's stream channel (inbox, start, outgoing, finish) carrying vertical messages as they
    are, with a shallower inbox, a per-message timeout and errors that name the peer."""

    def __init__(self, peer: str, timeout: float):
        super().__init__()
        self.inbox, self.peer, self.timeout = queue.Queue(DEPTH), peer, timeout

    def _read(self, incoming) -> None:
        try:
            for m in incoming:
                if not self._put(self.inbox, m):
                    break
        except grpc.RpcError as exc:  # on the server side a bare RpcError: gRPC ended the call
            self.reason = (f"{exc.code().name}: {exc.details()}" if hasattr(exc, "code") else
                           "the call ended abnormally: the peer vanished, or a message above the "
                           "size limit, the deadline or a cancel cut it off")
        except Exception as exc:  # noqa: BLE001 - a dropped stream ends the run with its reason
            self.reason = f"{type(exc).__name__}: {exc}"
        self.ended.set()

    def send(self, msg) -> None:
        self.outbox.put(msg)

    def recv(self, during: str):
        end = time.monotonic() + self.timeout
        while True:
            try:
                return self.inbox.get(timeout=0.2)
            except queue.Empty:
                if self.ended.is_set() and self.inbox.empty():
                    how = f"broke ({self.reason})" if self.reason else "closed"
                    raise PartyError(f"party {self.peer!r}: the connection {how} during {during}") from None
                if time.monotonic() >= end:
                    raise PartyError(f"party {self.peer!r}: no message within {self.timeout} s "
                                     f"during {during}") from None
