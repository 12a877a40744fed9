"""Chunk engines: train the clients of one chunk together.

An engine maps a chunk's padded batches ``(C, S, B, ...)`` to a :class:`ChunkResult` with a
leading client axis. Two engines exist:

* :class:`VmapEngine`, the generic path: the algorithm's pure ``ClientUpdate`` under
  ``torch.func.vmap``. It works for every model and transform that ``local_training`` accepts.
  The global parameters enter unbatched (``in_dims=None``), so the first local step of every
  client is one shared product over ``C * B`` samples; the client axis appears after it.
* ``atoll.runtime.fused.FusedMLP``, a hand-fused path for ReLU MLPs trained by SGD with
  optional proximal and weight-decay terms (FedAvg, FedProx, FedAdam, ... with ``sgd``
  locally); ``select_engine`` uses it only where it recognises every part, else the generic
  path. Both give ``LoopRuntime``'s results (tests/runtime, float64, 1e-9).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.func import vmap

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
    """``vmap(client_update)`` over the chunk: params/broadcast shared, the rest batched."""

    name = "vmap"

    def __init__(self, client_update):
        def as_tuple(params, cstate, broadcast, batches, step_mask, key):
            res = client_update(params, cstate, broadcast, batches, step_mask, key)
            return res.delta, res.aux, res.client_state, res.metrics

        self._fn = vmap(as_tuple, in_dims=(None, 0, None, 0, 0, 0))

    def run(self, params: Tree, cstates: dict, broadcast: dict, batches: dict,
            step_mask: torch.Tensor, keys: torch.Tensor, out: Tree | None = None) -> ChunkResult:
        """``keys``: the clients' keys ``(C,)``, or a function that makes them (only engines that
        use keys call it); ``out`` (optional, unused here): where the caller would like the
        deltas written."""
        keys = keys() if callable(keys) else keys
        delta, aux, cstate, metrics = self._fn(params, cstates, broadcast, batches, step_mask, keys)
        return ChunkResult(_cpu(delta), _cpu(aux), cstate, metrics["loss"].tolist(),
                           metrics["samples"].tolist(), metrics["steps"].tolist())


def _cpu(tree: Tree) -> Tree:
    return {k: v.detach().cpu() for k, v in tree.items()}


def select_engine(client_update, fused: bool = True):
    """The fused engine where it applies to ``client_update``, else :class:`VmapEngine`."""
    if fused:
        from atoll.runtime.fused import FusedMLP, match

        spec = match(client_update)
        if spec is not None:
            return FusedMLP(spec)
    return VmapEngine(client_update)
