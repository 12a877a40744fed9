"""Per-sample gradient norms and clipped sums, two ways.

* ``per_sample_*`` (any model): materialise every sample's gradient with
  ``torch.func.vmap(torch.func.grad(...))`` (the slow oracle; memory ``B x model``).
* ``ghost_*`` (``nn.Sequential`` of ``nn.Linear`` and parameter-free layers): never build a
  per-sample gradient. With ``a_i`` a layer's input and ``b_i = d loss_i / d (layer output)``
  (one backward pass of the *summed* loss gives all ``b_i``, since sample ``i`` only touches
  row ``i``), the weight gradient of sample ``i`` is ``b_i^T a_i``, so
  ``||g_i||^2 = ||a_i||^2 ||b_i||^2`` for one input row and, for sequence inputs ``(B, T, in)``,
  the Gram form ``<A_i A_i^T, B_i B_i^T>_F`` (Goodfellow 2015; Li et al. 2022 "ghost clipping");
  the bias adds ``||sum_t b_it||^2``. The clipped sum ``sum_i c_i g_i`` is then one product
  ``(c * B)^T A`` per layer ("book-keeping", Bu et al. 2023): no second backward pass.

Both return the same numbers (``tests/privacy`` checks 1e-10 in float64). All functions are
pure tensor code and work under an outer ``vmap`` over clients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from atoll.tree import Tree


def linear_stack(model: nn.Module) -> list[tuple[str, object]] | None:
    """``[("linear", "0."), ("fn", ReLU()), ...]`` if ghost clipping applies, else ``None``."""
    if isinstance(model, nn.Linear):
        return [("linear", "")] if model.bias is not None else None
    if not isinstance(model, nn.Sequential):
        return None
    out: list[tuple[str, object]] = []
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            out.append(("linear", name + "."))
        elif not any(True for _ in layer.parameters()) and not any(True for _ in layer.buffers()):
            out.append(("fn", layer))
        else:
            return None
    return out if any(kind == "linear" for kind, _ in out) else None


# ------------------------------------------------------------------ materialised (oracle)
def per_sample_grads(model: nn.Module, params: Tree, x: torch.Tensor, y: torch.Tensor) -> Tree:
    """Every sample's cross-entropy gradient: a tree of ``(B, *shape)``."""

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def per_sample_losses(model: nn.Module, params: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")


def norms_of(grads: Tree) -> torch.Tensor:
    """Per-sample global L2 norms ``(B,)`` of a tree of ``(B, ...)`` gradients."""
    return torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))


def weighted_sum(grads: Tree, factors: torch.Tensor) -> Tree:
    """``sum_i factors_i * g_i`` for a tree of ``(B, ...)`` gradients."""
    return {k: torch.tensordot(factors.to(g.dtype), g, dims=1) for k, g in grads.items()}


# ------------------------------------------------------------------ ghost clipping
def ghost_forward(stack, params: Tree, x: torch.Tensor, y: torch.Tensor):
    """Forward, then backward of the *summed* loss by per-layer ``vjp``s.

    Returns ``(losses (B,), inputs, outgrads)``: each linear layer's input ``a`` and the
    gradient ``b`` of the summed loss w.r.t. its output (row ``i`` is ``d loss_i / d z_i``).
    """
    h, inputs, back = x, [], []
    for kind, item in stack:
        if kind == "linear":
            w = params[item + "weight"]
            inputs.append(h)
            h = F.linear(h, w, params[item + "bias"])
            back.append(("linear", w))
        else:
            h, pull = vjp(item, h)
            back.append(("fn", pull))
    losses, pull = vjp(lambda z: F.cross_entropy(z, y, reduction="none"), h)
    (g,) = pull(torch.ones_like(losses))
    outgrads = []
    for kind, item in reversed(back):
        if kind == "linear":
            outgrads.append(g)
            g = g @ item
        else:
            (g,) = item(g)
    return losses.detach(), inputs, outgrads[::-1]


def ghost_norms(inputs, outgrads) -> torch.Tensor:
    """Per-sample gradient norms ``(B,)`` from layer inputs and output gradients."""
    sq = 0.0
    for a, b in zip(inputs, outgrads):
        if a.dim() == 2:  # (B, in), (B, out)
            sq = sq + a.pow(2).sum(1) * b.pow(2).sum(1) + b.pow(2).sum(1)
        else:  # (B, T..., in): Gram form, T flattened
            a3, b3 = a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])
            gram = (a3 @ a3.transpose(1, 2)) * (b3 @ b3.transpose(1, 2))  # (B, T, T)
            sq = sq + gram.sum((1, 2)) + b3.sum(1).pow(2).sum(1)
    return torch.sqrt(sq)


def ghost_per_sample_grads(stack, inputs, outgrads) -> Tree:
    """Every sample's gradient ``(B, *shape)`` from layer inputs and output gradients (an outer
    product per layer; no per-sample backward pass). For per-coordinate clipping."""
    out, prefixes = {}, [item for kind, item in stack if kind == "linear"]
    for pre, a, b in zip(prefixes, inputs, outgrads):
        a3, b3 = a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])
        out[pre + "weight"] = torch.einsum("bto,bti->boi", b3, a3)
        out[pre + "bias"] = b3.sum(1)
    return out


def per_sample(model: nn.Module, params: Tree, x: torch.Tensor, y: torch.Tensor):
    """``(per-sample gradients (B, ...), losses (B,))``: by ghost outer products where the model
    allows it, else ``vmap(grad)``."""
    stack = linear_stack(model)
    if stack is None:
        return per_sample_grads(model, params, x, y), per_sample_losses(model, params, x, y).detach()
    losses, inputs, outgrads = ghost_forward(stack, params, x, y)
    return ghost_per_sample_grads(stack, inputs, outgrads), losses


def ghost_weighted_sum(stack, inputs, outgrads, factors: torch.Tensor) -> Tree:
    """``sum_i factors_i g_i`` as one product per layer (weight and bias)."""
    out, prefixes = {}, [item for kind, item in stack if kind == "linear"]
    for pre, a, b in zip(prefixes, inputs, outgrads):
        cb = b * factors.reshape(-1, *([1] * (b.dim() - 1))).to(b.dtype)
        a2, cb2 = a.reshape(-1, a.shape[-1]), cb.reshape(-1, cb.shape[-1])
        out[pre + "weight"] = cb2.transpose(0, 1) @ a2
        out[pre + "bias"] = cb2.sum(0)
    return out
