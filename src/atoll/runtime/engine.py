"""Chunk engines: train the clients of one chunk together.

An engine maps a chunk's padded batches ``(C, S, B, ...)`` to a :class:`ChunkResult` with a
leading client axis. Two engines exist:

* :class:`VmapEngine`, the generic path: the algorithm's pure ``ClientUpdate`` under
  ``torch.func.vmap``. It works for every model and transform that ``local_training`` accepts.
  The global parameters enter unbatched (``in_dims=None``), so the first local step of every
  client is one shared product over ``C * B`` samples; the client axis appears after it.
* ``atoll.runtime.fused.FusedMLP``, a hand-fused path for ReLU MLPs trained by SGD with
  optional proximal and weight-decay terms (FedAvg, FedProx, FedAdam, ... with ``sgd``
  locally); ``runtime.vmap.select_engine`` uses it only where it recognises every part, else
  the generic path. Both give ``LoopRuntime``'s results (tests/runtime, float64, 1e-9).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.func import vmap

from atoll.client import as_update
from atoll.tree import Tree

log = logging.getLogger("atoll")


@dataclass
class ChunkResult:
    """Results of a chunk, row ``c`` for the chunk's client ``c`` (on the CPU)."""

    delta: Tree               # (C, ...)
    aux: Tree                 # (C, ...) or {}
    client_state: dict        # (C, ...) leaves, the non-codec client state
    loss: list[float]
    samples: list[float]
    steps: list[int]


class VmapEngine:
    """``vmap(client_update)`` over the chunk: params/broadcast shared, the rest batched.
    A model's buffers (``client_update.buffers``: BatchNorm's running statistics) enter
    batched, one copy per client, since each client's forward passes update its own."""

    name = "vmap"

    def __init__(self, client_update):
        def as_tuple(params, cstate, broadcast, batches, step_mask, key):
            res = client_update(params, cstate, broadcast, batches, step_mask, key)
            return res.delta, res.aux, res.client_state, res.metrics

        self._as_tuple = as_tuple
        self._buffers = as_update(client_update).buffers
        self._fn = vmap(as_tuple, in_dims=(None, 0, None, 0, 0, 0))

    def run(self, params: Tree, cstates: dict, broadcast: dict, batches: dict,
            step_mask: torch.Tensor, keys: torch.Tensor, out: Tree | None = None) -> ChunkResult:
        """``keys``: the clients' keys ``(C,)``, or a function that makes them (only engines that
        use keys call it); ``out`` (optional, unused here): where the caller would like the
        deltas written."""
        keys = keys() if callable(keys) else keys
        fn = self._fn
        if self._buffers:
            C = step_mask.shape[0]
            params = {k: v.expand(C, *v.shape) if k in self._buffers else v for k, v in params.items()}
            dims = {k: 0 if k in self._buffers else None for k in params}
            fn = vmap(self._as_tuple, in_dims=(dims, 0, None, 0, 0, 0))
        delta, aux, cstate, metrics = fn(params, cstates, broadcast, batches, step_mask, keys)
        return ChunkResult(_cpu(delta), _cpu(aux), cstate, metrics["loss"].tolist(),
                           metrics["samples"].tolist(), metrics["steps"].tolist())


class PerClient:
    """No batched engine: the clients of a chunk train one by one on the loop runtime's path
    (``uplink.one_by_one``). For updates whose training draws random numbers (``random``:
    dropout), which must come from each client's key as in ``LoopRuntime``; vmap cannot seed
    a draw per client."""

    name = "per-client"

    def __init__(self, client_update):
        self.reason = (f"model {as_update(client_update).model_name} draws random numbers "
                       "in training (dropout): each client's come from its own key, which vmap "
                       "cannot do, so its clients train one by one (the loop runtime's path)")


def _cpu(tree: Tree) -> Tree:
    return {k: v.detach().cpu() for k, v in tree.items()}
