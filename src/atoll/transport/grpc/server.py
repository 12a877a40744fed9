"""The gRPC side of the coordinator: TLS, authentication, chunked streams.

``GrpcServer(backend, identify, ...)`` serves the four methods of ``messages.METHODS`` and maps
them onto ``backend`` (``join``, ``next_task``, ``submit``, ``status``), which knows nothing about
gRPC. Every call is authenticated first: with mutual TLS the peer certificate (already verified
against the private CA by the TLS layer) is passed to ``identify("cert", pem)``; with token
authentication the ``authorization: Bearer ...`` metadata is passed to ``identify("token", t)``.
``identify`` returns ``(name, client_id)`` for an enrolled client (``client_id`` None for an
observer, which may only ask for status) or None, which ends the call with UNAUTHENTICATED.

No single gRPC message exceeds ``chunk_bytes`` plus a small margin (the server refuses larger
ones); payloads travel as streams of chunks. ``limits`` (``limits.Limits``) bound what a caller
can hold: connections and their handshake time, concurrent calls, one open ``GetTask`` and one
``SubmitUpdate`` per client, a server-side deadline on every call, keepalive, log lines.
``listen`` (a bounded server with TLS) and ``identity`` (who is calling) serve the peers too.
"""
from __future__ import annotations

import logging
from concurrent import futures

import grpc

from atoll.transport.grpc import messages as M
from atoll.transport.grpc.limits import Limits, RateLog, Slots, Watchdog, raise_fd_limit

log = logging.getLogger("atoll.deploy")


class GrpcServer:
    SERVICE, METHODS = M.SERVICE, M.METHODS  # a subclass serves another service the same way

    def __init__(self, backend, identify, *, address: str = "[::]:0", tls: dict | None = None,
                 auth: str = "mtls", chunk_bytes: int = 1 << 20, limits: Limits = Limits()):
        if auth not in ("mtls", "token"):
            raise ValueError(f"deploy.auth must be 'mtls' or 'token', got {auth!r}")
        if tls is None and auth == "mtls":
            raise ValueError("mutual TLS needs TLS: without TLS (--insecure) clients use tokens")
        self.backend, self.identify, self.auth, self.chunk = backend, identify, auth, chunk_bytes
        self.limits, self.slots, self.watchdog = limits, Slots(), Watchdog()
        self.refused = RateLog(log, limits.auth_log_per_min)
        self.server, self.port = listen(self.SERVICE, self.METHODS, lambda n: getattr(self, "_" + n.lower()),
                                        address=address, tls=tls, auth=auth,
                                        chunk_bytes=chunk_bytes, limits=limits)

    def start(self) -> int:
        self.server.start()
        return self.port

    def stop(self, grace: float | None = 1.0) -> None:
        self.server.stop(grace).wait()
        self.watchdog.stop()

    # ---- authentication ----------------------------------------------------------------------
    def _who(self, context, allow_observer: bool = False) -> tuple[str, int | None]:
        found = identity(context, self.auth, self.identify)
        if found is None:
            self.refused.warn("refused a call from %s: not an enrolled client", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "not an enrolled client")
        if found[1] is None and not allow_observer:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{found[0]} may only ask for status")
        return found

    # ---- methods -----------------------------------------------------------------------------
    def _join(self, request, context):
        name, cid = self._who(context)
        return M.JoinReply(**self.backend.join(name, cid), chunk_bytes=self.chunk)

    def _gettask(self, request, context):
        _, cid = self._who(context)
        self.slots.take(context, "GetTask", cid, self.watchdog, self.limits.rpc_timeout)
        held = (request.held_round, request.held_hash) if request.held_hash else None
        task = self.backend.next_task(cid, request.wait_s, held)
        if task[0] not in ("TASK", "SYNC", "STAGE"):
            yield M.TaskChunk(kind=task[0])
            return
        _, r, task_id, data, *stage = task
        yield M.TaskChunk(kind=task[0], round=r, task_id=task_id, total_bytes=len(data),
                          data=data[:self.chunk], stage=stage[0] if stage else 0)
        for i in range(self.chunk, len(data), self.chunk):
            yield M.TaskChunk(data=data[i:i + self.chunk])

    def _submitupdate(self, request_iterator, context):
        _, cid = self._who(context)
        self.slots.take(context, "SubmitUpdate", cid, self.watchdog, self.limits.rpc_timeout)
        first = next(request_iterator, None)
        if first is None:
            return M.SubmitReply(accepted=False, reason="empty update stream")
        head = {f: getattr(first, f) for f in ("round", "task_id", "num_examples", "loss",
                                                "samples", "straggler", "stage", "seconds")}

        def chunks():
            yield first.data
            for m in request_iterator:
                yield m.data

        accepted, reason = self.backend.submit(cid, head, chunks())
        return M.SubmitReply(accepted=accepted, reason=reason)

    def _status(self, request, context):
        self._who(context, allow_observer=True)
        return M.StatusReply(**self.backend.status())


def listen(service: str, methods: dict, handler, *, address: str, tls: dict | None, auth: str,
           chunk_bytes: int, limits: Limits) -> tuple[grpc.Server, int]:
    """A (not yet started) server of ``methods`` (``messages.METHODS``'s shape), ``handler(name)``
    serving each, bounded by ``limits``, no message over ``chunk_bytes`` plus a margin; TLS with
    ``tls`` (``key``, ``cert``, ``ca`` PEM bytes), client certificates required when ``auth`` is
    ``mtls``. Returns the server and its port."""
    raise_fd_limit()  # before limits.options() reads it
    limit = chunk_bytes + (1 << 16)
    # one thread per admitted call: a call beyond max_rpcs is refused, never queued
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.max_rpcs),
                         maximum_concurrent_rpcs=limits.max_rpcs,
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", limit), *limits.options()])
    handlers = {}
    for name, (req, rep, cs, ss) in methods.items():
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(cs, ss)]
        handlers[name] = make(handler(name), request_deserializer=req.FromString,
                              response_serializer=rep.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(tls["key"], tls["cert"])], root_certificates=tls["ca"],
                                            require_client_auth=(auth == "mtls"))
        port = server.add_secure_port(address, creds)
    if not port:
        raise ValueError(f"cannot listen on {address}")
    return server, port


def identity(context, auth: str, identify):
    """``identify("cert", pem)`` of the TLS-verified client certificate (``mtls``) or
    ``identify("token", t)`` of the ``authorization: Bearer t`` metadata; None without either."""
    if auth == "mtls":
        pem = context.auth_context().get("x509_pem_cert")
        return identify("cert", pem[0]) if pem else None
    bearer = dict(context.invocation_metadata()).get("authorization", "")
    return identify("token", bearer[7:]) if bearer.startswith("Bearer ") else None
