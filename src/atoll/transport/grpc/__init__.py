"""gRPC transport of a deployment: protobuf messages, the server side and the client side.

The only place that imports ``grpc``; ``atoll.deploy`` builds the coordinator and the client on
it, ``atoll.peers`` the peers of decentralized training (``peer.py``).
"""
import os

# gRPC core logs every failed TLS handshake (a refused client) at INFO on stderr; keep errors only
# unless the user asked for more.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
