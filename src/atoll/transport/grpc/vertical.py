"""Vertical training between party processes over gRPC: one bidirectional ``Exchange`` stream
per feature party, the label party listening and driving.

The label party::

    server = VerticalServer(["telecom"], identify, tls={...}, auth="token")
    server.start()
    channel = server.accept(timeout=600)      # a RemoteChannel once every party has dialled
    net = SplitNN([bank_bottom], label, channel=channel); net.fit(plan)
    channel.close()                           # "bye" to each party

A feature party: ``with dial(address, ca=..., token=...) as link: run_party(link, endpoint)``.

``RemoteChannel`` is ``atoll.vertical.channel.Channel`` whose ``ask`` to a remote party sends
the request down that party's stream and waits for its reply: the training code is the same as in
one process. Every request carries a sequence number (one more per message) and the training
step; a reply must carry the request's sequence number, step and field, and a request must be the
next in sequence of the current or the next step, so a replayed, reordered or stale message is
refused (``PartyError`` naming the party and the field). Payloads are ``vertical.wire`` (checked
before a tensor is made), then checked by the receiving party as in one process. A peer that
vanishes, errs or stays silent past ``timeout`` ends the run with a ``PartyError`` saying so at
once; the peer is told the reason. TLS, authentication, message size limit (``message_bytes``),
one stream per party and the server-side deadline are the deployment server's (``GrpcServer``).
"""
from __future__ import annotations

import contextlib
import threading

import grpc

from atoll.transport.grpc.client import open_channel
from atoll.transport.grpc.limits import Limits
from atoll.transport.grpc.link import Link
from atoll.transport.grpc.messages import build
from atoll.transport.grpc.server import GrpcServer
from atoll.vertical import wire
from atoll.vertical.channel import Channel, PartyError

PACKAGE = "atoll.vertical.v1"
SERVICE = f"{PACKAGE}.Vertical"
# kind: ask (label -> party), reply, error (text: why), bye; seq: the label's message number
VerticalMessage = build({"VerticalMessage": [
    ("kind", "string"), ("seq", "int64"), ("step", "int64"), ("name", "string"),
    ("dtype", "string"), ("shape", "string"), ("data", "bytes"), ("text", "string")]},
    PACKAGE)["VerticalMessage"]
METHODS = {"Exchange": (VerticalMessage, VerticalMessage, True, True)}
MESSAGE_BYTES = 16 << 20  # the largest payload of one message (an embedding of 65536 x 32 float64)


def _message(kind: str, seq: int, step: int, name: str, payload=None, text: str = ""):
    dtype, shape, data = wire.encode(payload)
    return VerticalMessage(kind=kind, seq=seq, step=step, name=name, dtype=dtype, shape=shape,
                           data=data, text=text[:2000])


class RemoteChannel(Channel):
    """A ``Channel`` whose remote parties are ``links`` (name -> ``Link``); local endpoints
    (``attach``) are served in this process as before. Counts the payload bytes like ``Channel``."""

    def __init__(self, links: dict[str, Link]):
        super().__init__()
        self.links, self.seq = dict(links), 0
        self.parties.update({name: link for name, link in links.items()})

    def ask(self, sender: str, receiver: str, name: str, msg, reply: str | None = None):
        link = self.links.get(receiver)
        if link is None:
            return super().ask(sender, receiver, name, msg, reply)
        self.seq += 1
        seq, step, field = self.seq, self.steps, reply or "ack"
        out = _message("ask", seq, step, name, msg)
        self.sent[(sender, receiver, name)] += len(out.data)
        self.messages += 1
        link.send(out)
        m = link.recv(f"step {step} (field {name!r})")
        if m.kind == "error":
            raise PartyError(f"party {receiver!r} stopped at step {step}: {m.text}")
        if (m.kind, m.seq, m.step, m.name) != ("reply", seq, step, name):
            raise PartyError(f"party {receiver!r}: field {field!r}: got {m.kind!r} {m.name!r} of message "
                             f"{m.seq}, step {m.step}; expected the reply to message {seq}, step {step} "
                             "(replayed, stale or out of order)")
        got = wire.decode(m.dtype, m.shape, m.data, receiver, field)
        if (got is None) != (reply is None):
            raise PartyError(f"party {receiver!r}: field {field!r} is {'missing' if got is None else 'unexpected'}")
        if reply is not None:
            self.sent[(receiver, sender, reply)] += len(m.data)
            self.messages += 1
        return got

    def close(self, error: str = "", linger: float = 5.0) -> None:
        """Tell every remote party we are done (``bye``) or why we stopped (``error``)."""
        for link in self.links.values():
            link.send(_message("error" if error else "bye", self.seq + 1, self.steps, "", text=error))
            link.finish(linger)


def run_party(link: Link, endpoint, label: str = "label") -> int:
    """Serve ``endpoint`` (``on(name, msg, sender)``) to the label party at the other end of
    ``link`` until it says bye; returns the number of steps. PartyError on a malformed, replayed
    or out-of-order message (the label party is told why), on its error or its vanishing."""
    seq = step = 0
    while True:
        m = link.recv(f"after message {seq}, step {step}")
        if m.kind == "bye":
            return step
        if m.kind == "error":
            raise PartyError(f"party {label!r} stopped at step {m.step}: {m.text}")
        try:
            if m.kind != "ask" or m.seq != seq + 1 or m.step not in (step, step + 1):
                raise PartyError(f"party {label!r}: field {m.name[:40]!r}: {m.kind[:10]!r} message "
                                 f"{m.seq} of step {m.step}, expected message {seq + 1} of step "
                                 f"{step} or {step + 1} (replayed, stale or out of order)")
            seq, step = m.seq, m.step
            out = endpoint.on(m.name, wire.decode(m.dtype, m.shape, m.data, label, m.name), label)
            link.send(_message("reply", seq, step, m.name, out))
        except (PartyError, ValueError, TypeError, RuntimeError) as exc:
            link.send(_message("error", seq, step, m.name, text=str(exc)))
            link.finish(5.0)
            raise PartyError(str(exc)) from exc


class VerticalServer(GrpcServer):
    """The label party's listener: admits the enrolled ``parties`` (names from ``identify``), one
    stream each; ``accept`` waits for all of them and returns the ``RemoteChannel``."""
    SERVICE, METHODS = SERVICE, METHODS

    def __init__(self, parties, identify, *, address: str = "127.0.0.1:0", tls: dict | None = None,
                 auth: str = "token", timeout: float = 60.0, message_bytes: int = MESSAGE_BYTES,
                 limits: Limits = Limits(rpc_timeout=24 * 3600.0)):
        super().__init__(self, identify, address=address, tls=tls, auth=auth,
                         chunk_bytes=message_bytes, limits=limits)
        self.expected, self.timeout = list(parties), timeout
        self.links: dict[str, Link] = {}
        self.cond = threading.Condition()

    def _exchange(self, request_iterator, context):
        name, _ = self._who(context)
        with self.cond:
            if name not in self.expected or name in self.links:
                why = "already connected" if name in self.links else "not a party of this training"
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{name}: {why}")
            self.links[name] = link = Link(name, self.timeout)
            self.cond.notify_all()
        self.slots.take(context, "Exchange", name, self.watchdog, self.limits.rpc_timeout)
        context.add_callback(link.done.set)  # the call is over: later sends and receives fail at once
        link.start(_incoming(request_iterator, context))
        yield from link.outgoing()

    def accept(self, timeout: float = 600.0) -> RemoteChannel:
        with self.cond:
            if not self.cond.wait_for(lambda: set(self.expected) <= set(self.links), timeout):
                missing = sorted(set(self.expected) - set(self.links))
                raise TimeoutError(f"parties {missing} did not connect within {timeout} s")
            return RemoteChannel({n: self.links[n] for n in self.expected})


def _incoming(request_iterator, context):
    """The requests; if gRPC ended the call under us (a message above the size limit, the
    deadline, a cancel) the end is an error (gRPC raises one only sometimes), not a close."""
    yield from request_iterator
    if not context.is_active():
        raise grpc.RpcError()


@contextlib.contextmanager
def dial(address: str, *, timeout: float = 600.0, message_bytes: int = MESSAGE_BYTES,
         rpc_timeout: float = 24 * 3600.0, ca: bytes | None = None, cert: bytes | None = None,
         key: bytes | None = None, token: str | None = None, insecure: bool = False):
    """A ``Link`` to the label party at ``address``; ``timeout``: s it may stay silent."""
    limit = [("grpc.max_receive_message_length", message_bytes + (1 << 16)),
             ("grpc.max_send_message_length", message_bytes + (1 << 16))]
    channel = open_channel(address, limit, ca=ca, cert=cert, key=key, insecure=insecure)
    meta = (("authorization", f"Bearer {token.strip()}"),) if token else ()
    stub = channel.stream_stream(f"/{SERVICE}/Exchange", request_serializer=VerticalMessage.SerializeToString,
                                 response_deserializer=VerticalMessage.FromString)
    link = Link("label", timeout)
    try:
        link.start(stub(link.outgoing(), metadata=meta, timeout=rpc_timeout))
        yield link
    finally:
        link.finish(2.0)
        channel.close()
