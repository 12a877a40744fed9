"""Worker momentum (Karimireddy, He & Jaggi 2021, "Learning from History for Byzantine Robust
Optimization"): each client sends the exponential moving average of its updates,
``m_t = beta * m_{t-1} + (1 - beta) * update_t``, kept in its codec state.

Averaging over rounds shrinks the variance of honest updates, so a robust rule can tell the
honest cluster from Byzantine rows that a single noisy round would hide among (the same
mechanism as ByzFL's worker momentum). It is a client-side stage with state, which is what an
uplink codec is: ``chain(worker_momentum(0.9), top_k(0.1))`` compresses the average. Decoding
is the identity; the codec is linear given its state and biased (it lags the current update).
The state starts at zero, so the first rounds are damped by ``1 - beta^t`` (no correction, as in
the paper's algorithm).
"""
from __future__ import annotations

import torch

from atoll.codecs.base import Codec


def worker_momentum(beta: float = 0.9) -> Codec:
    """Send ``m = beta * m_prev + (1 - beta) * update``; keep ``m`` in the client's state."""
    if not 0 <= beta < 1:
        raise ValueError(f"worker_momentum: beta must be in [0, 1), got {beta}")

    def init(tree):
        return {k: torch.zeros_like(v) for k, v in tree.items() if v.is_floating_point()}

    def encode(tree, state, key):
        if set(state) != {k for k, v in tree.items() if v.is_floating_point()}:
            raise ValueError(f"worker_momentum: the update's entries do not match the momentum's "
                             f"{sorted(state)[:4]} (put worker_momentum first in a chain)")
        m = {k: (beta * state[k] + (1 - beta) * v.to(state[k].dtype)) if k in state else v
             for k, v in tree.items()}
        return {k: m[k].to(tree[k].dtype) for k in tree}, {k: m[k] for k in state}

    return Codec(f"worker_momentum({beta:g})", init=init, encode=encode, decode=dict,
                 unbiased=False)
