"""Real deployment: a coordinator and clients on different machines, over gRPC with TLS.

``Server`` (``atoll server``), ``Client`` (``atoll client``), ``status`` (``atoll status``),
``certs`` (``atoll certs``: private CA, certificates, tokens). See docs/deployment.md.
"""
from __future__ import annotations


def status(address: str, *, ca=None, cert=None, key=None, token=None, insecure=False) -> dict:
    """The coordinator's phase, round, connected clients and last metrics line (``Status`` RPC).

    Credentials as for ``Client``: paths (or bytes) of the CA, and a certificate and key or a
    token (an ``--observer`` enrolment is enough)."""
    from atoll.deploy.client import credentials
    from atoll.transport.grpc.client import Connection

    conn = Connection(address, **credentials(ca=ca, cert=cert, key=key, token=token,
                                             insecure=insecure))
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
