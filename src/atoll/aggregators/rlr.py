"""Robust learning rate (Ozdayi, Kantarcioglu & Gel, AAAI 2021): a sign vote per coordinate.

``rlr(theta, inner)``: ``inner`` combines the updates (default: the mean), then every coordinate
whose vote ``|sum_i sign(x_i)|`` over the participating updates is below ``theta`` has its sign
flipped (the server's learning rate on it is negated); the others are kept (the paper's
equation 4, and ``compute_robustLR`` in the authors' code).

- Votes: each participating client (weight > 0) casts one sign per coordinate, whatever its
  weight: a sample count is a claim (docs/robustness.md, threat model). The magnitude comes from
  ``inner`` with the weights ``inner`` asks for.
- Ties: ``sign(0) = 0``, so a client whose update is exactly zero on a coordinate abstains there
  (the paper's ``torch.sign``). A coordinate that only a few clients move (a backdoor trigger's
  weights, which honest data never lights) gets a small vote and is flipped.
- ``theta`` is an integer in ``[1, n]`` for a cohort of ``n`` updates: ``|sum of signs| <= n``,
  so a larger ``theta`` would flip every coordinate (refused by name), and ``theta = 0`` would
  never flip one. The paper sets it a little above the number of attackers.

The rule excludes no client (the inner rule's ``"excluded"`` is passed through for the anomaly
log) and records ``"flipped"``, the share of coordinates it flipped this round.
"""
from __future__ import annotations

import numbers

import torch

from atoll import tree as T
from atoll.aggregators.base import Aggregator, mean
from atoll.aggregators.robust import matrix, need
from atoll.tree import Tree


def sign_votes(rows: torch.Tensor) -> torch.Tensor:
    """``|sum_i sign(x_i)|`` per coordinate of the rows ``(n, D)``; zeros abstain."""
    return rows.sign().sum(dim=0).abs()


def rlr(theta: int, inner: Aggregator | None = None) -> Aggregator:
    if isinstance(theta, bool) or not isinstance(theta, numbers.Integral) or theta < 1:
        raise ValueError(f"rlr: theta must be an integer >= 1 (the least |sum of the clients' "
                         f"signs| that keeps a coordinate's sign), got {theta!r}")
    theta = int(theta)
    inner = inner or mean()

    def aggregate(decoded: Tree, weights: torch.Tensor, state):
        rows, like = matrix(decoded, weights)
        need("rlr", rows.shape[0], theta, f"theta = {theta}")
        out, inner_state = inner.aggregate(decoded, weights, state["inner"])
        flip = sign_votes(rows) < theta  # (D,)
        vec = T.flatten(out)
        vec = torch.where(flip, -vec, vec)
        gone = inner_state.get("excluded") if isinstance(inner_state, dict) else None
        return T.unflatten(vec, like), {"inner": inner_state, "flipped": float(flip.double().mean()),
                                        **({"excluded": gone} if gone else {})}

    def prepare(state, params, key):
        return {**state, "inner": inner.prepare(state["inner"], params, key)}

    return Aggregator(f"rlr(theta={theta})({inner.name})", needs_individual=True, weigh=inner.weigh,
                      aggregate=aggregate, init=lambda params: {"inner": inner.init(params)},
                      prepare=prepare if inner.prepare is not None else None)
