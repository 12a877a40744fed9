"""``Algorithm``: a frozen bundle of parts, and the server's half of a round.

An algorithm is ``(local_opt, uplink, aggregator, server_opt, downlink)``. The client half is
``local_training(loss_fn, local_opt)``; the server half, ``server_round``, aggregates the
decoded client deltas, turns the mean delta into a pseudo-gradient ``-mean(delta)`` and lets the
server optimizer step on it (Reddi et al. 2021: ``sgd(1.0)`` is FedAvg, ``adam`` is FedAdam).
Nothing here knows about runtimes, files or the wire.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atoll import tree as T
from atoll.aggregators import Aggregator, mean
from atoll.client import ClientUpdate, LossFn, local_training
from atoll.codecs import Codec, identity
from atoll.transforms.base import Transform, apply_updates
from atoll.tree import Tree
from atoll.types import ServerState


@dataclass(frozen=True)
class Algorithm:
    name: str
    local_opt: Transform
    server_opt: Transform
    uplink: Codec = field(default_factory=identity)
    downlink: Codec = field(default_factory=identity)
    aggregator: Aggregator = field(default_factory=mean)

    def __post_init__(self):
        # Build-time checks that the parts fit together.
        if not isinstance(self.local_opt, Transform) or not isinstance(self.server_opt, Transform):
            raise TypeError(f"{self.name}: local_opt and server_opt must be Transforms")

    def init(self, params: Tree) -> ServerState:
        params = T.clone(params)
        return ServerState(params=params, opt_state=self.server_opt.init(params), round=0,
                           extra={"aggregator": self.aggregator.init(params)})

    def broadcast(self, state: ServerState) -> dict[str, Tree]:
        """What the server sends every sampled client this round."""
        return {"params": state.params}

    def client(self, loss_fn: LossFn) -> ClientUpdate:
        return local_training(loss_fn, self.local_opt)

    def server_round(self, state: ServerState, deltas: Tree | None, weights: torch.Tensor | None,
                     aux: Tree | None = None) -> ServerState:
        """Apply one round of decoded client deltas ``(C, ...)``; ``None`` = nobody succeeded."""
        if deltas is None:
            return ServerState(state.params, state.opt_state, state.round + 1, state.extra)
        agg, agg_state = self.aggregator.aggregate(deltas, weights, state.extra["aggregator"])
        pseudo_grad = T.scale(agg, -1.0)
        updates, opt_state = self.server_opt.update(pseudo_grad, state.opt_state, state.params, {})
        params = apply_updates(state.params, updates)
        return ServerState(params, opt_state, state.round + 1, {**state.extra, "aggregator": agg_state})
