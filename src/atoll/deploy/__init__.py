"""Real deployment: a coordinator and clients on different machines, over gRPC with TLS.

``Server`` (``atoll server``), ``Client`` (``atoll client``), ``status`` (``atoll status``),
``certs`` (``atoll certs``: private CA, certificates, tokens). See docs/deployment.md.
"""
from __future__ import annotations


def status(address: str, **credentials) -> dict:
    """The coordinator's round, connected clients and last metrics line (``Status`` RPC)."""
    from atoll.transport.grpc.client import Connection

    conn = Connection(address, **credentials)
    try:
        return conn.status()
    finally:
        conn.close()


def __getattr__(name):  # lazy: importing atoll.deploy does not import grpc
    if name == "Server":
        from atoll.deploy.server import Server
        return Server
    if name == "Client":
        from atoll.deploy.client import Client
        return Client
    raise AttributeError(name)


__all__ = ["Client", "Server", "status"]
