"""The ``Codec`` abstraction: how a tree becomes a payload on the wire and back.

``encode(tree, state, key) -> (payload, state)`` runs on the sender; ``decode(payload) -> tree``
on the receiver. A payload is itself a tree (``dict[str, Tensor]``), serialised to bytes by
``atoll.transport.wire``. ``state`` is the sender's codec state (e.g. an error-feedback residual),
kept in the client state. Properties:

* ``linear``: payloads add: the sum of payloads is the payload of the sum, so they may be
  summed (e.g. by secure aggregation) and the sum decoded once. For every codec but
  ``count_sketch`` decoding also commutes with the sum; a sketch is decoded (median, top-k)
  only once, from the sum;
* ``unbiased``: ``E[decode(encode(x))] = x``;
* ``event``: the privacy event one encode causes, or ``None``;
* ``plain``: the codec sends the tree as it is and keeps no state (only ``identity()``): a
  runtime may then lay every message of a round out as rows of one buffer;
* ``at_round``: for a codec with randomness that all clients of a round must share (the count
  sketch's hashes), ``at_round(key)`` is the codec of the round whose shared key is ``key``;
  ``None`` for the others. Runtimes encode with ``for_round(codec, key)``.

``chain`` encodes in order and decodes in reverse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from atoll import rng
from atoll.tree import Tree


@dataclass(frozen=True)
class Codec:
    name: str
    init: Callable[[Tree], Any]
    encode: Callable[[Tree, Any, int], tuple[Tree, Any]]
    decode: Callable[[Tree], Tree]
    linear: bool = True
    unbiased: bool = True
    event: Any = None
    at_round: Callable[[int], "Codec"] | None = None
    plain: bool = False


def for_round(codec: Codec, key: int) -> Codec:
    """The codec every client of a round encodes with: its shared randomness drawn from the
    round's ``key`` (``rng.key(seed, round, rng.SERVER, "uplink")``); ``codec`` itself if it has none."""
    return codec if codec.at_round is None else codec.at_round(key)


def identity() -> Codec:
    """Send the tree as it is (lossless, linear, unbiased)."""
    return Codec(
        name="identity",
        init=lambda tree: (),
        encode=lambda tree, state, key: (dict(tree), state),
        decode=lambda payload: dict(payload),
        plain=True,
    )


def chain(*codecs: Codec) -> Codec:
    """Apply codecs in order on encode, in reverse on decode."""
    if not codecs:
        return identity()

    def init(tree):
        return tuple(c.init(tree) for c in codecs)

    def encode(tree, state, key):
        new = []
        for i, (c, s) in enumerate(zip(codecs, state)):
            tree, s = c.encode(tree, s, rng.fold(key, i))
            new.append(s)
        return tree, tuple(new)

    def decode(payload):
        for c in reversed(codecs):
            payload = c.decode(payload)
        return payload

    events = [c.event for c in codecs if c.event is not None]

    def at_round(key):
        return chain(*(for_round(c, rng.fold(key, i)) for i, c in enumerate(codecs)))

    return Codec(
        name="+".join(c.name for c in codecs),
        init=init,
        encode=encode,
        decode=decode,
        linear=all(c.linear for c in codecs),
        unbiased=all(c.unbiased for c in codecs),
        event=events[0] if len(events) == 1 else (tuple(events) or None),
        at_round=at_round if any(c.at_round for c in codecs) else None,
    )
