"""What bounds a gRPC server against denial of service (docs/deployment.md, "Denial of service").

``Limits`` are the knobs (``[deploy]`` keys of the same names, see ``Limits.options``); the
helpers enforce what gRPC cannot: one open call per client and method (``Slots``), a server-side
deadline on every call whatever deadline the client asked for (``Watchdog``), and a bounded
rate of log lines for refused calls (``RateLog``).
"""
from __future__ import annotations

import logging
import resource
import threading
import time
from dataclasses import dataclass

import grpc

FD_RESERVE = 64  # descriptors kept for files, logs and checkpoints when connections pile up


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 5.0      # s for a new connection to finish TLS and HTTP/2 setup
    rpc_timeout: float = 300.0          # s any one call may last (long poll + download, upload)
    max_rpcs: int = 64                  # concurrent calls; more get RESOURCE_EXHAUSTED at once
    max_connections: int | None = None  # open connections; None: the descriptor limit - FD_RESERVE
    keepalive: float = 60.0             # s between the server's pings on a quiet connection
    idle_timeout: float = 300.0         # s a connection without calls stays open
    auth_log_per_min: int = 10          # "refused a call" log lines per minute, then a count

    def options(self) -> list[tuple[str, int]]:
        """The gRPC core channel arguments of these limits."""
        ms = lambda s: max(1, int(s * 1000))  # noqa: E731
        return [("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout)),
                ("grpc.max_allowed_incoming_connections", self.connections()),
                ("grpc.max_connection_idle_ms", ms(self.idle_timeout)),
                # a call that never reaches a handler (a unary request whose message never comes)
                # escapes the Watchdog: closing each connection at 2 + 1 (grace) x rpc_timeout ends it
                ("grpc.max_connection_age_ms", ms(2 * self.rpc_timeout)),
                ("grpc.max_connection_age_grace_ms", ms(self.rpc_timeout)),
                ("grpc.keepalive_time_ms", ms(self.keepalive)),
                ("grpc.keepalive_timeout_ms", ms(min(20.0, self.keepalive))),
                # a client may ping at most every 10 s without data; 2 strikes and it is cut off
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 2)]

    def connections(self) -> int:
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, soft - FD_RESERVE) if soft != resource.RLIM_INFINITY else 1 << 20


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class Slots:
    """At most one open call per (method, client); a second one ends with RESOURCE_EXHAUSTED."""

    def __init__(self):
        self.lock, self.open = threading.Lock(), set()

    def take(self, context, method: str, cid: int, watchdog: Watchdog, seconds: float) -> None:
        key = (method, cid)
        with self.lock:
            taken = key in self.open
            self.open.add(key)
        if taken:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"client {cid} already has an open {method} call (one at a time)")
        token = watchdog.arm(context, seconds)

        def release():
            watchdog.disarm(token)
            with self.lock:
                self.open.discard(key)

        if not context.add_callback(release):  # the call already ended
            release()


class Watchdog:
    """Cancels every call still running ``seconds`` after it was armed (one thread for all)."""

    def __init__(self, tick: float = 0.25):
        self.cond, self.calls, self.tick, self.next = threading.Condition(), {}, tick, 0
        self.thread: threading.Thread | None = None
        self.cancelled, self.stopped = 0, False

    def arm(self, context, seconds: float) -> int:
        with self.cond:
            self.next += 1
            self.calls[self.next] = (time.monotonic() + seconds, context)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="atoll-rpc-watchdog", daemon=True)
                self.thread.start()
            return self.next

    def disarm(self, token: int) -> None:
        with self.cond:
            self.calls.pop(token, None)

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def _run(self) -> None:
        while not self.stopped:
            with self.cond:
                self.cond.wait(self.tick)
                now = time.monotonic()
                late = [t for t, (end, _) in self.calls.items() if end <= now]
                contexts = [self.calls.pop(t)[1] for t in late]
                self.cancelled += len(contexts)
            for context in contexts:
                context.cancel()


class RateLog:
    """``warn(...)`` logs at most ``per_min`` lines a minute, then one line with the count it skipped."""

    def __init__(self, log: logging.Logger, per_min: int):
        self.log, self.per_min = log, per_min
        self.lock, self.window, self.count, self.skipped = threading.Lock(), 0.0, 0, 0

    def warn(self, fmt: str, *args) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.window >= 60.0:
                if self.skipped:
                    self.log.warning("%d more refused calls in the last minute (not logged)", self.skipped)
                self.window, self.count, self.skipped = now, 0, 0
            self.count += 1
            if self.count > self.per_min:
                self.skipped += 1
                return
        self.log.warning(fmt, *args)
