"""The client's connection to a coordinator: it always dials out, and pulls its tasks.

``Connection(address, ca=..., cert=..., key=...)`` (mutual TLS), ``Connection(address, ca=...,
token=...)`` (server TLS plus a bearer token) or ``Connection(address, token=..., insecure=True)``
(plaintext, local experiments only). Methods return plain Python values; any gRPC failure becomes
a ``TransportError`` whose ``retryable`` says whether trying again later can help (the server is
down or restarting) or not (this client is not enrolled).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import grpc

from atoll.transport.grpc import messages as M

MAX_CHUNK = 3 << 20
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


class TransportError(RuntimeError):
    def __init__(self, code: str, details: str, retryable: bool):
        super().__init__(f"{code}: {details}")
        self.code, self.details, self.retryable = code, details, retryable


@dataclass(frozen=True)
class Task:
    kind: str            # TASK, SYNC, STAGE, WAIT or DONE
    round: int = 0
    task_id: str = ""
    data: bytes = b""
    stage: int = 0       # STAGE: the secure-aggregation stage (1-4)


class Connection:
    SERVICE, METHODS = M.SERVICE, M.METHODS  # a subclass calls another service the same way

    def __init__(self, address: str, *, ca: bytes | None = None, cert: bytes | None = None,
                 key: bytes | None = None, token: str | None = None, insecure: bool = False,
                 chunk_bytes: int = 1 << 20, timeout: float = 60.0, max_task_bytes: int = 256 << 20):
        # the server picks the chunk size (at most 3 MiB, deploy.chunk_kb) and says it in Join
        options = [("grpc.max_receive_message_length", MAX_CHUNK + (1 << 16)),
                   ("grpc.max_send_message_length", MAX_CHUNK + (1 << 16))]
        self.channel = open_channel(address, options, ca=ca, cert=cert, key=key, insecure=insecure)
        self.meta = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        self.chunk, self.timeout, self.max_task = chunk_bytes, timeout, max_task_bytes
        self.stubs = {}
        for name, (req, rep, cs, ss) in self.METHODS.items():
            kind = {(False, False): self.channel.unary_unary, (False, True): self.channel.unary_stream,
                    (True, False): self.channel.stream_unary,
                    (True, True): self.channel.stream_stream}[(cs, ss)]
            self.stubs[name] = kind(f"/{self.SERVICE}/{name}", request_serializer=req.SerializeToString,
                                    response_deserializer=rep.FromString)

    def close(self) -> None:
        self.channel.close()

    def join(self) -> dict:
        reply = self._call("Join", M.JoinRequest(version="1"))
        self.chunk = min(reply.chunk_bytes or self.chunk, MAX_CHUNK)
        return {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}

    def get_task(self, wait_s: float = 10.0, held: tuple[int, str] | None = None) -> Task:
        """The next task; ``held``: the round and hash of the model this client holds."""
        request = M.TaskRequest(wait_s=wait_s, **({} if held is None else
                                                  {"held_round": held[0], "held_hash": held[1]}))

        def receive():
            stream = self.stubs["GetTask"](request, metadata=self.meta, timeout=wait_s + self.timeout)
            head = next(stream)
            if head.kind not in ("TASK", "SYNC", "STAGE"):
                return Task(head.kind)
            if head.total_bytes > self.max_task:  # refused before a byte more is received
                stream.cancel()
                raise TransportError("RESOURCE_EXHAUSTED", f"task of {head.total_bytes} bytes "
                                     f"exceeds this client's limit of {self.max_task} bytes", False)
            parts, size = [head.data], len(head.data)
            for c in stream:
                size += len(c.data)
                if size > head.total_bytes:
                    stream.cancel()
                    break
                parts.append(c.data)
            data = b"".join(parts)
            if size != head.total_bytes:
                raise TransportError("DATA_LOSS", f"task of {size} bytes or more, announced "
                                     f"{head.total_bytes}", True)
            return Task(head.kind, head.round, head.task_id, data, head.stage)

        return _wrap(receive)

    def submit(self, round: int, task_id: str, data: bytes, *, num_examples: int,  # noqa: A002
               loss: float, samples: float, straggler: bool = False, stage: int = 0,
               seconds: float = 0.0) -> tuple[bool, str]:
        def chunks():
            yield M.UpdateChunk(round=round, task_id=task_id, num_examples=num_examples, loss=loss,
                                samples=samples, straggler=straggler, data=data[:self.chunk],
                                stage=stage, seconds=seconds)
            for i in range(self.chunk, len(data), self.chunk):
                yield M.UpdateChunk(data=data[i:i + self.chunk])

        reply = _wrap(lambda: self.stubs["SubmitUpdate"](chunks(), metadata=self.meta,
                                                          timeout=self.timeout))
        return reply.accepted, reply.reason

    def status(self) -> dict:
        reply = self._call("Status", M.StatusRequest())
        out = {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}
        out["last_metrics"] = json.loads(out.pop("last_metrics_json") or "{}")
        return out

    def _call(self, name: str, request):
        return _wrap(lambda: self.stubs[name](request, metadata=self.meta, timeout=self.timeout))


def open_channel(address: str, options: list, *, ca: bytes | None = None, cert: bytes | None = None,
                 key: bytes | None = None, insecure: bool = False) -> grpc.Channel:
    """A TLS channel (mutual with ``cert``/``key``) or, with ``insecure``, a plaintext one."""
    if insecure:
        return grpc.insecure_channel(address, options=options)
    if ca is None:
        raise ValueError("a TLS connection needs the CA certificate (ca.pem from `atoll certs init`)")
    if (cert is None) != (key is None):
        raise ValueError("give both the client certificate and its key, or neither")
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert), options=options)


def _wrap(fn):
    try:
        return fn()
    except grpc.RpcError as exc:
        code = exc.code()
        raise TransportError(code.name, exc.details() or "", code in RETRYABLE) from None
