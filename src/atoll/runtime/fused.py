"""A fused fast path of local training for stacks of ``Linear`` / ``ReLU`` / ``Tanh`` layers.

``torch.func.vmap(grad(...))`` spends most of a small model's step in per-op dispatch. For
feed-forward nets (logistic regression, MLPs such as the 2NN) this module runs the clients of a
chunk with explicit batched products instead: forward with ``baddbmm``, backward of the masked
mean cross-entropy by hand, the local ``Transform`` applied under ``vmap`` (so any transform
works unchanged), and masked steps leaving parameters and optimizer state untouched. It computes
exactly what ``client.local_training`` computes (checked against it and against ``LoopRuntime``
in float64, ``tests/runtime``); other models fall back to the generic vmap path.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_map

from atoll.transforms.base import apply_updates


def layers_of(model) -> list[tuple[str, str]] | None:
    """``[("linear", prefix), ("relu", ""), ...]`` when ``model`` is such a stack, else None."""
    if isinstance(model, nn.Linear) and model.bias is not None:
        return [("linear", "")]
    if not isinstance(model, nn.Sequential):
        return None
    out = []
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            out.append(("linear", name + "."))
        elif isinstance(layer, (nn.ReLU, nn.Tanh)):
            out.append((type(layer).__name__.lower(), ""))
        else:
            return None
    return out if out and out[-1][0] == "linear" else None


def _forward(layers, p, x):
    """Batched forward; the logits and every layer's input. p: (C, ...), x: (C, B, F)."""
    acts, h = [], x
    for kind, pre in layers:
        acts.append(h)
        if kind == "linear":
            h = torch.baddbmm(p[pre + "bias"].unsqueeze(1), h, p[pre + "weight"].transpose(1, 2))
        else:
            h = torch.relu(h) if kind == "relu" else torch.tanh(h)
    return h, acts


def grad_and_loss(layers, p, x, y, mask):
    """Per-client gradients of the masked mean cross-entropy and its value: (C, ...), (C,)."""
    logits, acts = _forward(layers, p, x)
    m = mask.to(logits.dtype)
    denom = m.sum(1).clamp(min=1.0)  # (C,)
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (C, B)
    loss = (nll * m).sum(1) / denom
    d = logp.exp().scatter_add(-1, y.unsqueeze(-1), -torch.ones_like(nll).unsqueeze(-1))
    d = d * (m / denom.unsqueeze(1)).unsqueeze(-1)  # dLoss/dlogits (C, B, K)
    grads = {}
    for (kind, pre), a in zip(reversed(layers), reversed(acts)):
        if kind == "linear":
            grads[pre + "weight"] = torch.bmm(d.transpose(1, 2), a)
            grads[pre + "bias"] = d.sum(1)
            if a is not acts[0]:
                d = torch.bmm(d, p[pre + "weight"])
        elif kind == "relu":
            d = d * (a > 0)
        else:
            d = d * (1 - torch.tanh(a) ** 2)
    return grads, loss


def local_training(layers, transform, params, batches, step_mask):
    """The fused equivalent of ``vmap(client.local_training(...))`` from a shared start model.

    ``params``: the broadcast model (unbatched); ``batches``: ``x (C, S, B, F)``, ``y``, ``mask``;
    ``step_mask``: ``(C, S)``. Returns the stacked ``(delta, metrics)``.
    """
    c = step_mask.shape[0]
    p = {k: v.expand(c, *v.shape).contiguous() for k, v in params.items()}
    state = vmap(transform.init)(p)
    update = vmap(lambda g, s, q: transform.update(g, s, q, {}))
    dtype = next(iter(params.values())).dtype
    loss_sum, seen = torch.zeros(c, dtype=dtype), torch.zeros(c, dtype=dtype)
    for s in range(step_mask.shape[1]):
        active = step_mask[:, s]
        if not bool(active.any()):
            continue
        grads, loss = grad_and_loss(layers, p, batches["x"][:, s], batches["y"][:, s], batches["mask"][:, s])
        upd, new_state = update(grads, state, p)
        new_p = apply_updates(p, upd)
        p = {k: torch.where(_b(active, v), new_p[k], v) for k, v in p.items()}
        state = tree_map(lambda a, b: torch.where(_b(active, a), a, b), new_state, state)
        n = batches["mask"][:, s].sum(1).to(dtype) * active.to(dtype)
        loss_sum, seen = loss_sum + loss * n, seen + n
    delta = {k: v - params[k] for k, v in p.items()}
    return delta, {"loss": loss_sum / seen.clamp(min=1.0), "samples": seen, "steps": step_mask.sum(1)}


def _b(active: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (C,) mask against a (C, ...) tensor."""
    return active.view(-1, *([1] * (like.dim() - 1)))
