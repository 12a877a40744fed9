"""Tree maths. A ``Tree`` is a ``dict[str, Tensor]``: a model's parameters or an update.

Batched trees carry a leading client axis ``(C, ...)``. All functions are pure and work
under ``torch.func`` transforms (no in-place ops, no ``.item()``).
"""
from __future__ import annotations

from typing import Callable

import torch

Tree = dict[str, torch.Tensor]


def map(fn: Callable[..., torch.Tensor], tree: Tree, *rest: Tree) -> Tree:  # noqa: A001
    """Apply ``fn`` leaf-wise over trees with the same keys."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def add(a: Tree, b: Tree) -> Tree:
    return {k: a[k] + b[k] for k in a}


def sub(a: Tree, b: Tree) -> Tree:
    return {k: a[k] - b[k] for k in a}


def scale(a: Tree, s) -> Tree:
    return {k: v * s for k, v in a.items()}


def axpy(alpha, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y`` leaf-wise."""
    return {k: alpha * x[k] + y[k] for k in x}


def zeros_like(a: Tree) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def clone(a: Tree) -> Tree:
    return {k: v.detach().clone() for k, v in a.items()}


def detach(a: Tree) -> Tree:
    return {k: v.detach() for k, v in a.items()}


def cast(a: Tree, dtype: torch.dtype) -> Tree:
    return {k: v.to(dtype) for k, v in a.items()}


def vdot(a: Tree, b: Tree) -> torch.Tensor:
    """Inner product of two trees (a scalar tensor)."""
    return sum((a[k] * b[k]).sum() for k in a)


def norm(a: Tree) -> torch.Tensor:
    """Global L2 norm over all leaves."""
    return torch.sqrt(sum((v * v).sum() for v in a.values()))


def size(a: Tree) -> int:
    """Number of scalar entries."""
    return sum(v.numel() for v in a.values())


def all_finite(a: Tree) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())


def where(cond: torch.Tensor, a: Tree, b: Tree) -> Tree:
    """Select ``a`` where the scalar ``cond`` is true, else ``b`` (vmap-safe)."""
    return {k: torch.where(cond, a[k], b[k]) for k in a}


def stack(trees: list[Tree]) -> Tree:
    """List of C trees -> one batched tree with leading axis C."""
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def unstack(tree: Tree) -> list[Tree]:
    n = next(iter(tree.values())).shape[0]
    return [{k: v[i] for k, v in tree.items()} for i in range(n)]


def weighted_sum(batched: Tree, weights: torch.Tensor) -> Tree:
    """``sum_c w_c * x_c`` over the leading axis of a batched tree."""
    return {k: torch.tensordot(weights.to(v.dtype), v, dims=1) for k, v in batched.items()}


def flatten(a: Tree) -> torch.Tensor:
    """Concatenate all leaves, in the tree's insertion order (``unflatten``'s order), into one vector."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(vec: torch.Tensor, like: Tree) -> Tree:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def join(nested: dict[str, Tree]) -> Tree:
    """``{"params": {"w": t}}`` -> ``{"params/w": t}`` (a flat tree for the wire)."""
    return {f"{group}/{k}": v for group, sub in nested.items() for k, v in sub.items()}


def split(flat: Tree) -> dict[str, Tree]:
    """Inverse of ``join``."""
    out: dict[str, Tree] = {}
    for name, v in flat.items():
        group, _, k = name.partition("/")
        out.setdefault(group, {})[k] = v
    return out
