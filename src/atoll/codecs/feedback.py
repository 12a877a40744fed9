"""Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD"):
what a biased codec drops is kept and sent later.

``error_feedback(inner)`` encodes ``x = update + residual`` with ``inner`` and keeps
``residual' = x - decode(encode(x))`` in the codec state. Nothing is lost: after any number of
rounds ``sum(decoded) + residual == sum(updates)`` (up to float rounding). The state is
``{"residual": tree like the model, "inner": inner's state}``, a tree of tensors, so the
vectorised runtime keeps it in its ``ClientStore`` with the rest of the client state.

``error_feedback`` must see model-shaped trees: put it first in a chain (or after codecs that keep
names and shapes, e.g. a clip) and put the biased codecs inside it:
``error_feedback(chain(top_k(0.01), stochastic_quantize(4)))``.
"""
from __future__ import annotations

import torch

from atoll.codecs.base import Codec


def error_feedback(inner: Codec) -> Codec:
    """Add the residual of ``inner`` to the next update; keep the new residual in the state."""
    if not isinstance(inner, Codec):
        raise ValueError(f"error_feedback: inner must be a Codec, got {type(inner).__name__}")
    name = f"error_feedback({inner.name})"

    def init(tree):
        residual = {k: torch.zeros_like(v) for k, v in tree.items() if v.is_floating_point()}
        return {"residual": residual, "inner": inner.init(tree)}

    def encode(tree, state, key):
        res = state["residual"]
        dense = {k: v for k, v in tree.items() if v.is_floating_point()}
        if set(dense) != set(res) or any(res[k].shape != v.shape for k, v in dense.items()):
            raise ValueError(f"{name}: the update's floating entries {sorted(dense)[:4]} do not match "
                             f"the residual's {sorted(res)[:4]} (put error_feedback first in a chain)")
        x = {k: v + res[k].to(v.dtype) if k in res else v for k, v in tree.items()}
        payload, inner_state = inner.encode(x, state["inner"], key)
        sent = inner.decode(payload)
        residual = {k: (x[k] - sent[k].to(x[k].dtype)).to(res[k].dtype) for k in res}
        return payload, {"residual": residual, "inner": inner_state}

    at_round = None if inner.at_round is None else (lambda key: error_feedback(inner.at_round(key)))
    return Codec(name, init=init, encode=encode, decode=inner.decode, linear=inner.linear,
                 unbiased=False, event=inner.event, at_round=at_round)
