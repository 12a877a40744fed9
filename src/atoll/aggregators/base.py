"""The ``Aggregator`` abstraction and the sample-weighted mean.

``aggregate(decoded, weights, state) -> (tree, state)``: ``decoded`` is a batched tree with a
leading client axis ``(C, ...)``, ``weights`` a ``(C,)`` tensor of non-negative weights.
``needs_individual`` says the rule must see each client's update (robust rules); such a rule
cannot sit behind secure aggregation, which only reveals the sum.
``prepare(state, params, key) -> state``, where a rule has one, is called by the server step
just before ``aggregate`` with the round's global model and server key (FLTrust trains its own
root-data update there). A rule may list the rows it left out of its output in its returned
state under ``"excluded"`` (row indices among the participating clients; ``atoll.aggregators.
anomaly``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from atoll import tree as T
from atoll.tree import Tree


@dataclass(frozen=True)
class Aggregator:
    name: str
    init: Callable[[Tree], Any]
    aggregate: Callable[[Tree, torch.Tensor, Any], tuple[Tree, Any]]
    needs_individual: bool = False
    weigh: Callable[[list[int], torch.Tensor], torch.Tensor] = None  # (ids, samples) -> weights
    prepare: Callable[[Any, Tree, int], Any] | None = None  # (state, global params, server key) -> state

    def weights(self, client_ids: list[int], samples: torch.Tensor) -> torch.Tensor:
        """The aggregation weights of a cohort, from its ids and training-set sizes."""
        return samples if self.weigh is None else self.weigh(client_ids, samples)


def mean(weighting="samples") -> Aggregator:
    """Weighted mean ``sum_c w_c x_c / sum_c w_c`` (FedAvg's rule; McMahan et al. 2017).

    ``weighting``: ``"samples"`` (w_c = n_c, the client's training-set size), ``"uniform"``
    (w_c = 1), or custom weights: a sequence or mapping indexed by client id.
    """

    def aggregate(decoded: Tree, weights: torch.Tensor, state):
        total = weights.sum()
        if not bool(total > 0):
            raise ValueError("mean(): the weights of the cohort sum to zero")
        return T.weighted_sum(decoded, weights / total), state

    return Aggregator("mean", init=lambda params: (), aggregate=aggregate,
                      weigh=_weigh(weighting))


def _weigh(weighting):
    if weighting == "samples":
        return None
    if weighting == "uniform":
        return lambda ids, samples: torch.ones_like(samples)
    if isinstance(weighting, str):
        raise ValueError(f"weighting must be 'samples', 'uniform' or per-client weights, got {weighting!r}")
    table = weighting
    return lambda ids, samples: torch.tensor([float(table[i]) for i in ids], dtype=samples.dtype)
