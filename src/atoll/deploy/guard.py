"""The coordinator's checks beyond the bytes (``runtime.check`` validates those): the header of
an update, the norms of a round's accepted updates, the finiteness of a new server state."""
from __future__ import annotations

import math

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path

from atoll import tree as T


def bad_header(head, max_examples: int) -> str | None:
    """What is wrong with an update's header (``num_examples``, ``loss``, ``samples``), or None."""
    n = head.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_examples:
        return (f"num_examples must be an integer in [1, {max_examples}] "
                f"(deploy.max_num_examples), got {n!r}")
    for name in ("loss", "samples"):
        v = getattr(head, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"{name} must be a finite number, got {v!r}"
    if head.samples < 0:
        return f"samples must be >= 0, got {head.samples!r}"
    return None


def l2(tree: dict) -> float:
    """L2 norm over the floating entries of ``tree``, in float64 (0 if none)."""
    floats = {k: v.double() for k, v in tree.items() if v.is_floating_point()}
    return float(T.norm(floats)) if floats else 0.0


def outliers(answers: dict, ratio: float | None) -> list[tuple[int, str]]:
    """``(client, reason)`` for each answer whose delta or aux norm exceeds ``ratio`` x the lower
    median of those norms: a bound that no minority of the answers can move. Nothing with one
    answer, without ``ratio``, or where the median is 0."""
    if ratio is None or len(answers) < 2:
        return []
    out = {}
    for what, attr in (("update", "norm"), ("aux", "aux_norm")):
        norms = {c: getattr(a, attr) for c, a in answers.items()}
        median = sorted(norms.values())[(len(norms) - 1) // 2]
        for c, n in norms.items():
            if median > 0 and n > ratio * median and c not in out:
                out[c] = (f"{what} L2 norm {n:.4g} exceeds {ratio:g} x the round's median "
                          f"{median:.4g} (deploy.max_norm_ratio)")
    return list(out.items())


def not_finite(state) -> str | None:
    """The name of the first tensor of ``state`` (params, optimizer, extra) with NaN or inf."""
    for part in ("params", "opt_state", "extra"):
        leaves, _ = tree_flatten_with_path(getattr(state, part))
        for path, v in leaves:
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return part + keystr(path)
    return None
