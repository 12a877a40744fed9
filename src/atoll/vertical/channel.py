"""What crosses between the parties of vertical training, and the receiver's checks on it.

The protocols (``split``, ``hetero_lr``) talk to the other parties only through a channel:
``Channel.ask(sender, receiver, name, msg, reply)`` hands ``msg`` to the receiver's endpoint (its
``on(name, msg, sender)``) and returns the reply the endpoint gives (None when ``reply`` is None).
In one process the endpoints are local objects; over gRPC (``atoll.transport.grpc.vertical``) a
subclass carries the same calls to another process, so the training code does not change.
Every message goes through ``Channel.send``: the receiver gets a copy with no autograd graph (so
nothing but the tensor or the bytes crosses) and the channel counts its bytes. A receiver checks
every tensor with ``check_tensor`` (type, dtype, shape, finiteness) before using it, and every row
selection with ``check_rows``; a failure is a ``PartyError`` naming the sending party and the
field, raised before the receiver's state changes.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


class PartyError(ValueError):
    """A message from another party is malformed; the text names the party and the field."""


def check_tensor(t, party: str, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``t`` if it is a finite ``dtype`` tensor of ``shape``; PartyError otherwise."""
    where = f"party {party!r}: field {name!r}"
    if not isinstance(t, torch.Tensor):
        raise PartyError(f"{where} is a {type(t).__name__}, expected a tensor")
    if t.dtype != dtype:
        raise PartyError(f"{where} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise PartyError(f"{where} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise PartyError(f"{where} holds NaN or infinite values")
    return t


def check_rows(rows, party: str, n: int, max_batch: int) -> torch.Tensor:
    """A batch's row positions: a 1-D int64 tensor of 1..``max_batch`` distinct rows in [0, n)."""
    where = f"party {party!r}: field 'rows'"
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.dim() != 1:
        raise PartyError(f"{where} must be a 1-D int64 tensor")
    if not 0 < rows.numel() <= max_batch:
        raise PartyError(f"{where} holds {rows.numel()} rows, expected 1..{max_batch}")
    if int(rows.min()) < 0 or int(rows.max()) >= n:
        raise PartyError(f"{where} points outside the {n} aligned rows")
    if rows.unique().numel() != rows.numel():
        raise PartyError(f"{where} repeats a row")
    return rows


def nbytes(msg, sender: str = "?", name: str = "?") -> int:
    if isinstance(msg, torch.Tensor):
        return msg.numel() * msg.element_size()
    if isinstance(msg, (bytes, bytearray)):
        return len(msg)
    raise PartyError(f"party {sender!r}: field {name!r} is a {type(msg).__name__}, expected a tensor or bytes")


@dataclass
class Channel:
    """Moves messages between parties and counts the bytes per (sender, receiver, field).
    A message a party sends to itself (the label party's own bottom model) is free."""

    sent: dict = field(default_factory=lambda: defaultdict(int))
    messages: int = 0
    parties: dict = field(default_factory=dict)  # name -> endpoint with on(name, msg, sender)
    steps: int = 0  # training steps begun (the drivers count them; a remote channel sends it)

    def attach(self, name: str, endpoint) -> None:
        self.parties[name] = endpoint

    def ask(self, sender: str, receiver: str, name: str, msg, reply: str | None = None):
        """``msg`` to ``receiver``'s endpoint; its answer, sent back as field ``reply``."""
        out = self.parties[receiver].on(name, self.send(sender, receiver, name, msg), sender)
        return None if reply is None else self.send(receiver, sender, reply, out)

    def begin_step(self) -> int:
        self.steps += 1
        return self.steps

    def send(self, sender: str, receiver: str, name: str, msg):
        size = nbytes(msg, sender, name)
        if sender != receiver:
            self.sent[(sender, receiver, name)] += size
            self.messages += 1
        return msg.detach().clone() if isinstance(msg, torch.Tensor) else bytes(msg)

    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.messages = 0
