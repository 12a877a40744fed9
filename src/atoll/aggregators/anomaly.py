"""Per-client anomaly scores of one round, for the run folder's ``anomaly.jsonl``.

For every participating client: the L2 norm of its update, its L2 distance to the rule's
output (the robust centre) and its cosine to it; and the clients the rule left out. Rules that
select clients name the rows they did not use under ``"excluded"`` in their returned state
(krum, multi_krum, bulyan, fltrust: trust 0, flame: outside the majority cluster); rules that
work per coordinate or reweigh every update (median, trimmed_mean, geometric_median,
centered_clipping, norm_bound, rlr, mean) exclude no client as a whole, and report ``[]`` (rlr
adds ``"flipped"``, the share of coordinates whose sign vote fell below its theta).
"""
from __future__ import annotations

import torch

from atoll import tree as T
from atoll.aggregators.robust import matrix
from atoll.tree import Tree


def _num(x: float) -> float:
    return float(f"{x:.6g}")  # six significant digits: stable JSON at any magnitude


def report(name: str, decoded: Tree, weights: torch.Tensor, out: Tree, state, ids) -> dict:
    """``{"rule", "clients", "norm", "dist", "cos", "excluded"}`` (ids, in row order; FLTrust
    adds its trust scores, RLR its share of flipped coordinates)."""
    rows, _ = matrix(decoded, weights)
    ids = list(ids) if len(ids) else list(range(weights.shape[0]))
    rows = rows.to(torch.float64)
    clients = [int(c) for c, w in zip(ids, weights.tolist()) if w > 0]
    centre = T.flatten(out).to(torch.float64)
    norm = rows.norm(dim=1)
    denom = norm * centre.norm()
    cos = torch.where(denom > 0, rows @ centre / denom.clamp_min(1e-300), torch.zeros_like(norm))
    gone = state.get("excluded", []) if isinstance(state, dict) else []
    return {"rule": name, "clients": clients, "norm": [_num(v) for v in norm.tolist()],
            "dist": [_num(v) for v in (rows - centre).norm(dim=1).tolist()],
            "cos": [_num(v) for v in cos.tolist()], "excluded": [clients[i] for i in gone],
            **({"trust": [_num(v) for v in state["trust"]]} if isinstance(state, dict) and "trust" in state else {}),
            **({"flipped": _num(state["flipped"])} if isinstance(state, dict) and "flipped" in state else {})}
