"""The downlink of US 2025/0265475 A1 ([0127]-[0136], claims 4-7): each client receives only
the coordinates that changed since the model it already holds, and the server keeps no model
copy per client.

Server state (``DeltaTracker.init``), all tensors: ``changed`` (``d``, int32), the round in which
each coordinate last changed; ``synced`` (``num_clients``, int32), the round of the model each
client last received (-1: none); ``anchor``, the round of the last model every client holds;
``round``. That is ``4 (d + num_clients)`` bytes, whatever the number of clients.

Why it is exact. A client that holds ``w_s`` and is sent, for a base round ``b <= s``, every
coordinate ``i`` with ``changed[i] > b`` together with its CURRENT value, ends up with ``w_t``:
the coordinates not sent have not changed since ``b``, so its ``w_s[i] = w_b[i] = w_t[i]``.
Sending current values rather than the difference ``w_t - w_b`` is the same information and
makes the client's copy bit-identical to the server's (no float round-off accumulates).

Bases (the seed's variants):

* ``base="client"`` (claims 6-7, [0132]-[0134]): ``b`` = the last round client ``c`` synced, so
  a client sampled every round gets only that round's changes, and one absent for many rounds
  all changes since. A client never synced gets the dense model, unless ``holds_initial``:
  every client already holds ``w_0`` (an atoll client builds the initial model from the run's
  config and seed), so its first message is the change since ``w_0``.
* ``base="initial"`` (claim 5, [0130]-[0131]): ``b = 0``, the change relative to ``w_0``, which
  every client is assumed to hold (deployed with the app). One message serves every client of a
  round, but it grows as the model drifts from ``w_0``.
* ``anchor_every=A`` (claim 4, [0135]-[0136]): every ``A`` rounds the server broadcasts to ALL
  clients the coordinates changed since the previous anchor (``anchor``), after which every
  client's base is at least that round: deltas stay sparse for rarely sampled clients and the
  ``initial`` message stops growing. Its bytes go to every client, sampled or not.

Messages (trees for ``atoll.transport.wire``): sparse ``{"idx/q", "idx/r", "idx/m"`` (the
Rice-coded indices of ``atoll.codecs.sparse_index``), ``"v"`` (values, the parameters'
promoted dtype)``}``, or dense ``{"w/<name>": tensor}``, whichever is fewer bytes. The client
calls ``apply(params, message)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atoll import tree as T
from atoll.codecs import flat, sparse_index
from atoll.tree import Tree

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class DeltaTracker:
    num_clients: int
    base: str = "client"
    anchor_every: int = 0
    holds_initial: bool = False  # every client holds w_0 (built from the run's seed): no dense first sync

    def __post_init__(self):
        if self.base not in ("client", "initial"):
            raise ValueError(f"DeltaTracker: base must be 'client' or 'initial', got {self.base!r}")
        if not (isinstance(self.num_clients, int) and self.num_clients >= 1):
            raise ValueError(f"DeltaTracker: num_clients must be an integer >= 1, got {self.num_clients!r}")
        if not (isinstance(self.anchor_every, int) and self.anchor_every >= 0):
            raise ValueError(f"DeltaTracker: anchor_every must be an integer >= 0, got {self.anchor_every!r}")

    def init(self, params: Tree) -> dict:
        """State for the initial model ``w_0`` (round 0)."""
        return {"round": torch.zeros((), dtype=torch.int64),
                "changed": torch.zeros(T.size(params), dtype=torch.int32),
                "synced": torch.full((self.num_clients,), -1, dtype=torch.int32),
                "anchor": torch.tensor(0 if self.base == "initial" or self.holds_initial else -1,
                                       dtype=torch.int64)}

    def commit(self, state: dict, old: Tree, new: Tree) -> dict:
        """The server moved from ``old`` to ``new``: next round; mark every coordinate whose bits
        changed (so any server optimizer works, not only ``server_topk``)."""
        r = state["round"] + 1
        diff = torch.cat([_bits(new[k]) != _bits(old[k]) for k in old])
        if diff.numel() != state["changed"].numel():
            raise ValueError(f"DeltaTracker.commit: {diff.numel()} coordinates, the state tracks "
                             f"{state['changed'].numel()}")
        return {**state, "round": r, "changed": torch.where(diff, r.to(torch.int32), state["changed"])}

    def anchor_due(self, state: dict) -> bool:
        r = int(state["round"])
        return self.anchor_every > 0 and r > int(state["anchor"]) and r % self.anchor_every == 0

    def anchor(self, state: dict, params: Tree) -> tuple[Tree, dict]:
        """The broadcast every client applies: the changes since the previous anchor."""
        return message(params, state["changed"], int(state["anchor"])), {**state, "anchor": state["round"].clone()}

    def base_round(self, state: dict, cid: int) -> int:
        """The round whose changes client ``cid`` already holds (-1: it needs the dense model)."""
        if not 0 <= cid < self.num_clients:
            raise ValueError(f"DeltaTracker: client id {cid} not in [0, {self.num_clients})")
        a = int(state["anchor"])
        return a if self.base == "initial" else max(int(state["synced"][cid]), a)

    def messages(self, state: dict, cids: list[int], params: Tree) -> tuple[list[Tree], dict]:
        """One message per client of ``cids`` (clients with the same base share it), and the state
        with those clients marked as holding the current model."""
        cache, out = {}, []
        for c in cids:
            b = self.base_round(state, c)
            if b not in cache:
                cache[b] = message(params, state["changed"], b)
            out.append(cache[b])
        synced = state["synced"].clone()
        synced[torch.as_tensor(list(cids), dtype=torch.long)] = state["round"].to(torch.int32)
        return out, {**state, "synced": synced}


def message(params: Tree, changed: torch.Tensor, base: int) -> Tree:
    """The coordinates with ``changed > base`` and their current values, or the dense model when
    that is not more bytes (always when ``base < 0``)."""
    dense = {f"w/{k}": v for k, v in params.items()}
    if base < 0:
        return dense
    idx = torch.nonzero(changed > base).reshape(-1)
    vec = torch.cat([v.detach().reshape(-1) for v in params.values()])
    if idx.numel() * vec.element_size() >= flat.wire_size(dense):  # values alone already cost more
        return dense
    sparse = {**sparse_index.encode(idx, "idx"), "v": vec[idx]}
    return sparse if flat.wire_size(sparse) < flat.wire_size(dense) else dense


def apply(params: Tree, msg: Tree) -> Tree:
    """The client's side: its model after receiving ``msg`` (a new tree; ``params`` untouched)."""
    if any(k.startswith("w/") for k in msg):
        missing = [k for k in params if f"w/{k}" not in msg]
        if missing or len(msg) != len(params):
            raise ValueError(f"downlink message: dense entries do not match the model (missing {missing[:3]})")
        out = {}
        for k, v in params.items():
            w = msg[f"w/{k}"]
            if w.shape != v.shape or w.dtype != v.dtype:
                raise ValueError(f"downlink message: entry 'w/{k}' is {w.dtype} {tuple(w.shape)}, "
                                 f"the model's {v.dtype} {tuple(v.shape)}")
            out[k] = w.clone()
        return out
    if "v" not in msg:
        raise ValueError("downlink message: neither dense 'w/...' entries nor sparse values 'v'")
    vec = torch.cat([v.detach().reshape(-1) for v in params.values()])
    if msg["v"].dtype != vec.dtype or msg["v"].dim() != 1:
        raise ValueError(f"downlink message: values 'v' are {msg['v'].dtype} {tuple(msg['v'].shape)}, "
                         f"expected 1-D {vec.dtype}")
    idx = sparse_index.decode(msg, "idx", msg["v"].numel(), vec.numel(), "downlink message")
    vec[idx] = msg["v"]
    out, i = {}, 0
    for k, v in params.items():
        out[k] = vec[i:i + v.numel()].reshape(v.shape).to(v.dtype)
        i += v.numel()
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of ``t`` as integers (flat), so -0.0 vs 0.0 and NaNs count as changes."""
    t = t.detach().reshape(-1)
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t
