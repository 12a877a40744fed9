"""gRPC between the peers of decentralized training (no server): one ``Send`` method.

Every peer runs a ``PeerServer`` (it receives its in-neighbours' messages) and holds a
``PeerChannel`` to each out-neighbour. A message is ``transport.wire`` bytes streamed in chunks;
the first chunk names the sender, the round and the total size. Servers, TLS, tokens or mutual
TLS, message size limits and the one-call-per-caller slots are those of the coordinator
(``server.listen``, ``server.identity``, ``client.open_channel``, ``limits``).

``backend.max_bytes`` bounds a message: a stream announcing more, or carrying more than it
announced, is refused before another chunk is read. ``backend.receive(peer, claimed, round,
data)`` decides the rest and returns ``(accepted, reason)``; ``identify`` maps credentials to
``(name, peer id)`` as for the coordinator.
"""
from __future__ import annotations

import logging

import grpc

from atoll.transport.grpc import messages
from atoll.transport.grpc.client import TransportError, _wrap, open_channel
from atoll.transport.grpc.limits import Limits
from atoll.transport.grpc.server import GrpcServer, identity

PACKAGE = "atoll.peer.v1"
SERVICE = f"{PACKAGE}.Peer"
_M = messages.build({
    # the first chunk carries sender, round and total_bytes; every chunk carries data
    "PeerChunk": [("sender", "int32"), ("round", "int64"), ("total_bytes", "int64"), ("data", "bytes")],
    "PeerReply": [("accepted", "bool"), ("reason", "string")],
}, PACKAGE)
PeerChunk, PeerReply = _M["PeerChunk"], _M["PeerReply"]
METHODS = {"Send": (PeerChunk, PeerReply, True, False)}

log = logging.getLogger("atoll.decentralized")


class PeerServer(GrpcServer):
    """The coordinator's gRPC server (TLS, authentication, limits) serving ``Send`` instead."""

    SERVICE, METHODS = SERVICE, METHODS

    def __init__(self, backend, identify, *, address: str = "127.0.0.1:0", tls: dict | None = None,
                 auth: str = "token", chunk_bytes: int = 1 << 20, limits: Limits = Limits()):
        super().__init__(backend, identify, address=address, tls=tls, auth=auth,
                         chunk_bytes=chunk_bytes, limits=limits)

    def stop(self, grace: float | None = 0.5) -> None:
        super().stop(grace)

    def _send(self, request_iterator, context):
        found = identity(context, self.auth, self.identify)
        if found is None or found[1] is None:
            self.refused.warn("refused a call from %s: not an enrolled peer", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "not an enrolled peer")
        peer = found[1]
        self.slots.take(context, "Send", peer, self.watchdog, self.limits.rpc_timeout)
        first = next(request_iterator, None)
        if first is None:
            return PeerReply(accepted=False, reason="empty message stream")
        limit = self.backend.max_bytes
        if first.total_bytes > limit:
            return self._refuse(peer, first, f"message of {first.total_bytes} bytes announced, "
                                f"the limit is {limit}")
        parts, size = [first.data], len(first.data)
        for chunk in request_iterator:
            size += len(chunk.data)
            if size > first.total_bytes:
                return self._refuse(peer, first, f"more than the {first.total_bytes} bytes announced")
            parts.append(chunk.data)
        if size != first.total_bytes:
            return self._refuse(peer, first, f"{size} bytes, {first.total_bytes} announced")
        accepted, reason = self.backend.receive(peer, first.sender, first.round, b"".join(parts))
        return PeerReply(accepted=accepted, reason=reason)

    def _refuse(self, peer: int, first, reason: str):
        self.backend.refuse(peer, first.round, reason)
        return PeerReply(accepted=False, reason=reason)


class PeerChannel:
    """The channel to one out-neighbour; ``send`` returns ``(accepted, reason)`` or raises
    ``TransportError`` (the neighbour is unreachable or did not answer within ``timeout``)."""

    def __init__(self, address: str, *, ca: bytes | None = None, cert: bytes | None = None,
                 key: bytes | None = None, token: str | None = None, insecure: bool = False,
                 chunk_bytes: int = 1 << 20, timeout: float = 10.0):
        options = [("grpc.max_receive_message_length", chunk_bytes + (1 << 16)),
                   ("grpc.max_send_message_length", chunk_bytes + (1 << 16))]
        self.channel = open_channel(address, options, ca=ca, cert=cert, key=key, insecure=insecure)
        self.meta = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        self.chunk, self.timeout = chunk_bytes, timeout
        self.stub = self.channel.stream_unary(f"/{SERVICE}/Send",
                                              request_serializer=PeerChunk.SerializeToString,
                                              response_deserializer=PeerReply.FromString)

    def send(self, sender: int, round: int, data: bytes, timeout: float | None = None):  # noqa: A002
        def chunks():
            yield PeerChunk(sender=sender, round=round, total_bytes=len(data), data=data[:self.chunk])
            for i in range(self.chunk, len(data), self.chunk):
                yield PeerChunk(data=data[i:i + self.chunk])

        reply = _wrap(lambda: self.stub(chunks(), metadata=self.meta, timeout=timeout or self.timeout))
        return reply.accepted, reply.reason

    def close(self) -> None:
        self.channel.close()


__all__ = ["PeerChannel", "PeerServer", "TransportError"]
