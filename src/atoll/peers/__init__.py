"""Decentralized training between real peers over gRPC with TLS (docs/decentralized.md).

``Peer`` (peer.py) holds one node's state and exchanges with its neighbours every round;
``Inbox`` (inbox.py) is what it accepts from the wire; ``enrol``, ``run`` and ``dpsgd_step``
(local.py) run peers on one machine and give them D-PSGD's local work.
"""
from atoll.peers.inbox import Inbox
from atoll.peers.local import dpsgd_step, enrol, run
from atoll.peers.peer import Peer

__all__ = ["Inbox", "Peer", "dpsgd_step", "enrol", "run"]
