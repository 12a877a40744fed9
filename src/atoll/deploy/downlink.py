"""The tracker's per-client downlink in deployment (docs/communication.md, "In deployment").

With ``algorithm.tracker`` (``atoll.downlink.DeltaTracker``) the coordinator sends each sampled
client its own payload, the wire messages that ``runtime.downlink.downlink_bytes`` counts in
simulation, one after the other: ``[anchor] + tracker message + [the broadcast's other
entries]``. In a round where an anchor is due, a client that is not sampled receives the anchor
alone (a ``SYNC``). The client keeps its copy of the model between rounds and applies them.

The tracker decides what each client holds from its own bookkeeping; in deployment that can be
wrong (a client lost its state file, was offline for an anchor, the server was restarted). So
the client says which model it holds, its round and a hash (``model_hash``), and the server
checks the hash against the models it had (``hashes``). When the client holds the model the
tracker assumes (or a later one), it gets exactly the simulation's messages; when it holds an
older verified model ``w_s``, the changes since ``s``; when it holds nothing verifiable, the
dense model. A delta is never sent against a model the client does not hold.

The client checks every message against its model before it is decoded (``receive``): the
number of messages, each entry's name, dtype and shape, the number of values and indices.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import torch

from atoll import tree as T
from atoll.codecs import bits, flat
from atoll.downlink import apply, message
from atoll.transport import wire

SPARSE = ("idx/q", "idx/r", "idx/m", "v")


def model_hash(params) -> str:
    """The SHA-256 of a model's wire bytes (names, dtypes, shapes and values)."""
    return hashlib.sha256(wire.dumps(params)).hexdigest()


def check_supported(algorithm) -> None:
    """Refuse, at server start, what a deployed client could not reproduce."""
    if algorithm.tracker is not None and getattr(algorithm.downlink, "name", None) != "identity":
        raise ValueError(f"comm.downlink = {algorithm.tracker.base!r} (per-client deltas) cannot be "
                         f"combined with the downlink codec {algorithm.downlink.name!r} in deployment: "
                         "the client rebuilds the model from the deltas, not from a coded broadcast")


@dataclass
class TrackedRound:
    """One round's per-client downlink on the server (``open_round``)."""
    params: dict
    changed: torch.Tensor   # the tracker's round of each coordinate's last change
    model_round: int        # the round of ``params``
    bases: dict             # client -> the tracker's base (what simulation sends it)
    messages: dict          # client -> the simulation's message bytes
    rest: bytes             # the broadcast's other entries (b"" if none)
    anchor: bytes | None = None
    anchor_base: int = -1
    anchored: set = field(default_factory=set)  # clients given (or found unable to use) the anchor

    def task(self, cid: int, held: int | None) -> bytes:
        """Client ``cid``'s payload; ``held``: the verified round of the model it holds (None)."""
        out = b""
        if self.anchor is not None and cid not in self.anchored:
            self.anchored.add(cid)
            if self.anchor_base < 0 or (held is not None and held >= self.anchor_base):
                out, held = self.anchor, self.model_round
        b = self.bases[cid]
        if b >= 0 and (held is None or held < b):  # it does not hold what the tracker assumes
            msg = wire.dumps(message(self.params, self.changed, -1 if held is None else held))
        else:
            msg = self.messages[cid]
        return out + msg + self.rest

    def sync(self, cid: int, held: int | None) -> bytes | None:
        """The anchor for a client not sampled this round, once (None: nothing to send)."""
        if self.anchor is None or cid in self.anchored:
            return None
        self.anchored.add(cid)
        ok = self.anchor_base < 0 or (held is not None and held >= self.anchor_base)
        return self.anchor if ok else None


def open_round(algorithm, state, cohort: list[int]):
    """``(TrackedRound, state)``: the tracker's steps of ``runtime.downlink.downlink_bytes``, in
    the same order, so the state and the messages are the simulation's."""
    tracker, ts = algorithm.tracker, state.extra["tracker"]
    anchor, anchor_base = None, -1
    if tracker.anchor_due(ts):
        anchor_base = int(ts["anchor"])
        msg, ts = tracker.anchor(ts, state.params)
        anchor = wire.dumps(msg)
    bases = {c: tracker.base_round(ts, c) for c in cohort}
    msgs, ts = tracker.messages(ts, cohort, state.params)
    known: dict[int, bytes] = {}  # clients with the same base share one message object
    blobs = {}
    for c, m in zip(cohort, msgs):
        if id(m) not in known:
            known[id(m)] = wire.dumps(m)
        blobs[c] = known[id(m)]
    rest = {k: v for k, v in algorithm.broadcast(state).items() if k != "params"}
    tracked = TrackedRound(state.params, ts["changed"], state.round, bases, blobs,
                           wire.dumps(T.join(rest)) if rest else b"", anchor, anchor_base)
    return tracked, replace(state, extra={**state.extra, "tracker": ts})


# ---- the client's side -----------------------------------------------------------------------
def payload_limit(model: dict, rest: dict | None) -> int:
    """The most bytes a payload can take: an anchor and a message, each at most the dense model,
    and the other entries."""
    return 2 * flat.wire_size({f"w/{k}": v for k, v in model.items()}) + (flat.wire_size(rest) if rest else 0)


def receive(data: bytes, held: dict | None, model: dict, rest: dict | None) -> tuple[dict, dict]:
    """``(the model after the payload, the broadcast's other entries)``. ``held``: the client's
    copy (None: it holds none); ``model``: a tree with the model's dtypes and shapes; ``rest``:
    a tree like the broadcast's other entries, joined (None for an anchor alone).
    Raises ValueError naming what is wrong, before anything is decoded."""
    limit = payload_limit(model, rest)
    if len(data) > limit:
        raise ValueError(f"downlink payload of {len(data)} bytes exceeds the {limit} bytes this "
                         "model's messages can take")
    try:
        spans = wire.spans(data)
    except wire.WireError as exc:
        raise ValueError(f"downlink payload: {exc}") from None
    n = len(spans) - (1 if rest else 0)
    if not (1 <= n <= (1 if rest is None else 2)):
        want = "one anchor" if rest is None else "[anchor] + model" + (" + other entries" if rest else "")
        raise ValueError(f"downlink payload: {len(spans)} messages, expected {want}")
    for i, (specs, _, _) in enumerate(spans[:n]):
        check_message(specs, model, held is not None or i > 0, f"downlink message {i + 1}")
    if rest and {s[0]: s[1:] for s in spans[-1][0]} != {s[0]: s[1:] for s in spec(rest)}:
        got = {s[0] for s in spans[-1][0]} ^ set(rest)
        raise ValueError(f"downlink payload: the broadcast's other entries do not match the "
                         f"algorithm's (entries {sorted(got)[:3] or 'with another dtype or shape'})")
    for _, a, b in spans[:n]:
        held = apply(held if held is not None else model, wire.loads(data[a:b]))
    other = T.split(wire.loads(data[spans[-1][1]:])) if rest else {}
    return held, other


def check_message(specs: list, model: dict, holds: bool, what: str) -> None:
    """A tracker message's entries: dense ``w/<name>`` exactly like the model, or sparse
    ``idx/q, idx/r, idx/m`` (uint8) and ``v`` (the model's dtype, at most ``d`` values)."""
    names = {s[0]: s for s in specs}
    if any(n.startswith("w/") for n in names):
        want = {f"w/{k}": (f"w/{k}", v.dtype, tuple(v.shape)) for k, v in model.items()}
        for n, s in names.items():
            if n not in want or (s[1], tuple(s[2])) != want[n][1:]:
                raise ValueError(f"{what}: entry {n!r} is not one of the model's dense entries "
                                 f"({s[1]} {tuple(s[2])})")
        if len(names) != len(want):
            raise ValueError(f"{what}: the dense model misses entries {sorted(set(want) - set(names))[:3]}")
        return
    if set(names) != set(SPARSE):
        raise ValueError(f"{what}: entries {sorted(names)}, expected dense 'w/...' or {list(SPARSE)}")
    if not holds:
        raise ValueError(f"{what}: sparse, but this client holds no model to apply it to")
    d = sum(v.numel() for v in model.values())
    dtype = _promoted(model)
    _, vt, vs = names["v"]
    if vt != dtype or len(vs) != 1:
        raise ValueError(f"{what}: entry 'v' is {vt} {tuple(vs)}, expected 1-D {dtype}")
    k = vs[0]
    if k > d:
        raise ValueError(f"{what}: entry 'v' holds {k} values, the model has {d} coordinates")
    bound = {"idx/q": bits.packed_size(k + d, 1), "idx/r": bits.packed_size(k, bits.MAX_BITS), "idx/m": 1}
    for n, most in bound.items():
        _, t, s = names[n]
        if t != torch.uint8 or len(s) != 1 or s[0] > most:
            raise ValueError(f"{what}: entry {n!r} is {t} {tuple(s)}, expected 1-D uint8 of at "
                             f"most {most} bytes for {k} indices")
    if names["idx/m"][2][0] != 1:
        raise ValueError(f"{what}: entry 'idx/m' must hold one value")


def spec(tree: dict) -> list:
    """``[(name, dtype, shape)]`` of a tree, as ``wire.spans`` reports them."""
    return [(k, v.dtype, tuple(v.shape)) for k, v in tree.items()]


def _promoted(model: dict) -> torch.dtype:
    out = None
    for v in model.values():
        out = v.dtype if out is None else torch.promote_types(out, v.dtype)
    return out
