"""gRPC between the coordinator and the decryptors of homomorphic encryption: one ``Decrypt``
method, a stream of chunks each way (docs/secure-aggregation.md, "Homomorphic encryption").

The coordinator (``DecryptorChannel.decrypt``) streams the round's one summed ciphertext; the
first chunk names the round, the count of updates in the sum, the coordinates ``d`` and the
total size. The decryptor (``DecryptorServer``, the coordinator's ``GrpcServer`` with TLS,
tokens or mutual TLS, limits and one-call-per-caller slots) refuses a caller that is not
enrolled in its own registry, a size beyond ``backend.max_bytes(d)`` before another chunk is
read, and whatever ``backend.decrypt`` refuses (``FAILED_PRECONDITION`` with the reason); its
answer (``backend.reply_bytes(d)`` at most) travels back the same way.

With ``[secure] malicious`` the first chunk says ``signed``: the payload is the round's signed
inputs (``secure.he_signed.bundle``), ``count`` of them, for the run ``run``; the size limit is
``backend.max_signed(d, count)``, checked before another chunk is read, and the backend
(``Decryptor.decrypt_signed``) checks every signature and sums the inputs itself.
"""
from __future__ import annotations

import logging

import grpc

from atoll.secure.he import HEError
from atoll.transport.grpc.client import TransportError, _wrap, open_channel
from atoll.transport.grpc.limits import Limits
from atoll.transport.grpc.messages import build
from atoll.transport.grpc.server import GrpcServer

PACKAGE = "atoll.he.v1"
HeChunk = build({"HeChunk": [("round", "int64"), ("count", "int64"), ("d", "int64"),
                             ("total_bytes", "int64"), ("data", "bytes"),
                             ("signed", "bool"), ("run", "bytes")]}, PACKAGE)["HeChunk"]
METHODS = {"Decrypt": (HeChunk, HeChunk, True, True)}
SERVICE = f"{PACKAGE}.Decryptor"
log = logging.getLogger("atoll.deploy")


def _chunks(data: bytes, chunk: int, **head):
    yield HeChunk(total_bytes=len(data), data=data[:chunk], **head)
    for i in range(chunk, len(data), chunk):
        yield HeChunk(data=data[i:i + chunk])


def _join(stream, limit: int, what: str) -> tuple[object, bytes]:
    """The first chunk and the whole payload; ValueError past ``limit`` or the announced size."""
    first = next(stream, None)
    if first is None:
        raise ValueError(f"empty {what}")
    if first.total_bytes > limit:
        raise ValueError(f"{what} of {first.total_bytes} bytes announced, the limit is {limit}")
    parts, size = [first.data], len(first.data)
    for c in stream:
        size += len(c.data)
        if size > first.total_bytes:
            raise ValueError(f"{what}: more than the {first.total_bytes} bytes announced")
        parts.append(c.data)
    if size != first.total_bytes:
        raise ValueError(f"{what}: {size} bytes, {first.total_bytes} announced")
    return first, b"".join(parts)


class DecryptorServer(GrpcServer):
    """A decryptor's service (``atoll he serve``); ``backend``: ``secure.he_keys.Decryptor``."""

    SERVICE, METHODS = SERVICE, METHODS

    def __init__(self, backend, identify, *, address: str = "127.0.0.1:0", tls: dict | None = None,
                 auth: str = "token", chunk_bytes: int = 1 << 20, limits: Limits = Limits()):
        super().__init__(backend, identify, address=address, tls=tls, auth=auth,
                         chunk_bytes=chunk_bytes, limits=limits)

    def _decrypt(self, request_iterator, context):
        name, _ = self._who(context, allow_observer=True)  # an enrolled caller: the coordinator
        self.slots.take(context, "Decrypt", name, self.watchdog, self.limits.rpc_timeout)
        try:
            first = next(request_iterator, None)
            signed = first is not None and first.signed
            limit = (0 if first is None else self.backend.max_signed(first.d, first.count)
                     if signed else self.backend.max_bytes(first.d))
            head, blob = _join(_prepend(first, request_iterator), limit,
                               "signed inputs" if signed else "summed ciphertext")
            out = (self.backend.decrypt_signed(head.round, head.run, head.count, head.d, blob)
                   if signed else self.backend.decrypt(head.round, head.count, head.d, blob))
        except (ValueError, HEError) as exc:
            log.warning("he: refused a request from %s: %s", name, exc)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("he: round %d: decrypted the sum of %d %supdates for %s", head.round, head.count,
                 "signed " if signed else "", name)
        yield from _chunks(out, self.chunk, round=head.round, d=head.d)


def _prepend(first, rest):
    if first is not None:
        yield first
        yield from rest


class DecryptorChannel:
    """The coordinator's channel to one decryptor; ``decrypt`` returns its reply bytes or
    raises ``TransportError`` (down, refused, or a reply beyond ``max_reply``)."""

    def __init__(self, address: str, *, ca: bytes | None = None, cert: bytes | None = None,
                 key: bytes | None = None, token: str | None = None, insecure: bool = False,
                 chunk_bytes: int = 1 << 20, timeout: float = 600.0):
        options = [("grpc.max_receive_message_length", (3 << 20) + (1 << 16)),
                   ("grpc.max_send_message_length", chunk_bytes + (1 << 16))]
        self.address = address
        self.channel = open_channel(address, options, ca=ca, cert=cert, key=key, insecure=insecure)
        self.meta = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        self.chunk, self.timeout = chunk_bytes, timeout
        self.stub = self.channel.stream_stream(f"/{SERVICE}/Decrypt",
                                               request_serializer=HeChunk.SerializeToString,
                                               response_deserializer=HeChunk.FromString)

    def decrypt(self, round_: int, count: int, d: int, blob: bytes, max_reply: int,
                run: bytes | None = None) -> bytes:
        """``run``: None for one summed ciphertext, else ``blob`` is the run's signed inputs."""
        head = {"round": round_, "count": count, "d": d, "signed": run is not None, "run": run or b""}

        def call():
            stream = self.stub(_chunks(blob, self.chunk, **head),
                               metadata=self.meta, timeout=self.timeout)
            try:
                return _join(stream, max_reply, "decryptor reply")[1]
            except ValueError as exc:
                stream.cancel()
                raise TransportError("DATA_LOSS", str(exc), False) from None

        return _wrap(call)

    def close(self) -> None:
        self.channel.close()
