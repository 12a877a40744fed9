"""Count sketch (Charikar et al. 2002) as a linear uplink codec, FetchSGD-style (Rothchild et al.
2020, "FetchSGD: Communication-Efficient Federated Learning with Sketching").

``sketch(x, rows, cols, seed)``: row ``r`` adds ``sign_r(i) * x_i`` into bucket ``h_r(i)`` of a
``(rows, cols)`` table; ``h_r`` and ``sign_r`` are multiply-shift hashes whose constants come from
``seed`` (see ``hashes``; memoised per ``(d, rows, cols, seed)``). The table is linear in
``x``, and every client of a round uses the same ``seed``, so ``sketch(a) + sketch(b) ==
sketch(a + b)``: the server (or a secure sum, or a switch) adds the clients' tables and decodes
the sum once.

``unsketch(table, d, k, seed)``: the estimate of coordinate ``i`` is the median over rows of
``sign_r(i) * table[r, h_r(i)]``; with ``k`` only the ``k`` estimates largest in magnitude are
kept (the heavy hitters), the rest are zero. One row's estimate errs by about
``||x||_2 / sqrt(cols)`` (the coordinates sharing the bucket); the median over rows makes a large
error unlikely, so coordinates well above that level are found and estimated closely.

``count_sketch(rows, cols, k=None, seed=None)``: payload ``sketch/t`` = the table in the input's
float dtype, ``rows * cols * 4`` bytes for float32, whatever ``d``, and ``sketch/seed`` (one
int64: the hash seed). With ``seed=None`` every round draws new hashes from its shared key
(``codecs.for_round``), so over rounds a coordinate's collisions average out; a fixed ``seed``
keeps one set of hashes for the whole run. ``decode`` is ``unsketch(table, d, k, seed)``. Flags:
``linear`` (payloads of one round add), not flagged unbiased (top-k is not; without ``k`` the
estimate is unbiased over the rounds' hashes, ``tests/codecs``). Momentum and error
accumulation belong on the server, in sketch space, where they stay linear (FetchSGD).
``sum_payloads`` adds payloads of a linear codec entry by entry.
"""
from __future__ import annotations

import functools

import torch

from atoll import rng
from atoll.codecs import flat
from atoll.codecs.base import Codec
from atoll.tree import Tree

def hashes(d: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bucket (rows, d) int64, sign (rows, d) in {-1, +1} int8)`` of coordinates ``0..d-1``.

    Multiply-shift hashing (Dietzfelbinger et al. 1997) in wrapping 64-bit arithmetic:
    ``h = a i + b mod 2**64`` with odd ``a``; the bucket is the top 32 bits of ``h`` scaled to
    ``[0, cols)``, the sign the top bit of a second hash ``c i + e``.
    """
    g = rng.generator(rng.fold(seed, "count_sketch"))
    a, b, c, e = torch.randint(-2**63, 2**63 - 1, (4, rows, 1), generator=g, dtype=torch.int64)
    i = torch.arange(d, dtype=torch.int64)
    # in place: a new round's hashes cost ~90 ms for rows * d = 5e6 (~210 ms out of place)
    bucket = torch.mul(i, a | 1).add_(b).bitwise_right_shift_(32).bitwise_and_(0xFFFFFFFF)
    bucket = bucket.mul_(cols).bitwise_right_shift_(32)
    sign = torch.mul(i, c | 1).add_(e).lt_(0).to(torch.int8).mul_(2).sub_(1)
    return bucket, sign


@functools.lru_cache(maxsize=2)
def _plan(d: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index into the flattened table (rows * d,), sign (rows, d) float32)``, memoised: a
    pure function of its arguments, so every client and round reuse it (computing it costs
    more than sketching; with per-round hashes, once per round)."""
    bucket, sign = hashes(d, rows, cols, seed)
    return bucket.add_(torch.arange(rows)[:, None] * cols).reshape(-1), sign.to(torch.float32)


def sketch(x: torch.Tensor, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """The ``(rows, cols)`` count sketch of the 1-D ``x`` (same dtype)."""
    index, sign = _plan(x.numel(), rows, cols, seed)
    table = x.new_zeros(rows * cols)
    table.index_add_(0, index, (sign.to(x.dtype) * x).reshape(-1))
    return table.reshape(rows, cols)


def unsketch(table: torch.Tensor, d: int, k: int | None = None, seed: int = 0,
             estimator: str = "median") -> torch.Tensor:
    """Estimates of ``d`` coordinates from a (summed) sketch, the median or the mean over rows;
    only the top ``k`` if given."""
    rows, cols = table.shape
    index, sign = _plan(d, rows, cols, seed)
    per_row = table.reshape(-1)[index].reshape(rows, d) * sign.to(table.dtype)
    est = per_row.mean(0) if estimator == "mean" else _median_rows(per_row)
    if k is None or k >= d:
        return est
    keep = torch.topk(est.abs(), k, sorted=False).indices
    out = torch.zeros_like(est)
    out[keep] = est[keep]
    return out


def _median_rows(x: torch.Tensor) -> torch.Tensor:
    """Median over the (few) rows of ``x`` by an odd-even transposition network of elementwise
    min/max (``torch.median`` over a short axis is 5x slower); mean of the middle two if even."""
    r = list(x.unbind(0))
    for p in range(len(r)):
        for j in range(p % 2, len(r) - 1, 2):
            r[j], r[j + 1] = torch.minimum(r[j], r[j + 1]), torch.maximum(r[j], r[j + 1])
    n = len(r)
    return r[n // 2] if n % 2 else (r[n // 2 - 1] + r[n // 2]) / 2


def count_sketch(rows: int, cols: int, k: int | None = None, seed: int | None = None,
                 estimator: str = "median") -> Codec:
    """Send a ``(rows, cols)`` count sketch; decode the (summed) sketch to the top ``k``.

    ``seed=None`` (default): the hashes are drawn afresh every round from the round's shared key
    (``for_round``), the same for all clients of the round, so a collision is noise that averages
    out over rounds instead of a fixed bias; an integer ``seed`` keeps the same hashes for every
    round (atoll's earlier rule). The hash seed travels in the payload (``sketch/seed``), so the
    receiver decodes with the sender's hashes and ``sum_payloads`` refuses sketches of different
    rounds.

    ``estimator="mean"`` (with ``k=None``) makes decoding itself linear: the mean of the clients'
    decoded sketches IS the decoded mean of their tables, so a runtime that decodes each message
    on arrival computes exactly what summing the tables first (FetchSGD, a secure sum) would,
    and heavy coordinates are then chosen on the server (``downlink.server_topk``, with momentum
    and error accumulation there)."""
    if estimator not in ("median", "mean"):
        raise ValueError(f"count_sketch: estimator must be 'median' or 'mean', got {estimator!r}")
    for what, v in (("rows", rows), ("cols", cols)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"count_sketch: {what} must be an integer >= 1, got {v!r}")
    if k is not None and not (isinstance(k, int) and k >= 1):
        raise ValueError(f"count_sketch: k must be None or an integer >= 1, got {k!r}")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"count_sketch: seed must be None or an integer in [0, 2**63), got {seed!r}")
    name = (f"count_sketch({rows},{cols}{'' if k is None else f',k={k}'}"
            f"{'' if estimator == 'median' else ',mean'}{'' if seed is None else f',seed={seed}'})")
    return _codec(name, rows, cols, k, estimator, 0 if seed is None else seed, seed is None)


def _codec(name: str, rows: int, cols: int, k: int | None, estimator: str, seed: int,
           per_round: bool) -> Codec:
    def encode(tree, state, key):
        vec, out = flat.gather(tree, "sketch", name)
        out["sketch/t"] = sketch(vec, rows, cols, seed)
        out["sketch/seed"] = torch.tensor([seed], dtype=torch.int64)
        return out, state

    def decode(payload):
        t = flat.entry(payload, "sketch/t", name)
        if tuple(t.shape) != (rows, cols) or not t.is_floating_point():
            raise ValueError(f"{name} payload: table must be floating ({rows}, {cols}), "
                             f"got {t.dtype} {tuple(t.shape)}")
        s = flat.entry(payload, "sketch/seed", name, torch.int64)
        if tuple(s.shape) != (1,) or int(s[0]) < 0:
            raise ValueError(f"{name} payload: sketch/seed must be one integer >= 0, got {s.tolist()}")
        if not per_round and int(s[0]) != seed:
            raise ValueError(f"{name} payload: sketch/seed {int(s[0])} is not this codec's {seed}")
        d = flat.size(payload, "sketch")
        return flat.scatter(payload, "sketch", unsketch(t, d, k, int(s[0]), estimator), name)

    def at_round(key):
        return _codec(name, rows, cols, k, estimator, rng.fold(key, "count_sketch"), True)

    return Codec(name, init=lambda tree: (), encode=encode, decode=decode, linear=True,
                 unbiased=False, at_round=at_round if per_round else None)


def sum_payloads(payloads: list[Tree], weights: torch.Tensor | None = None) -> Tree:
    """``sum_c w_c * payload_c`` of a linear codec's payloads: data entries (floating, non-empty)
    are added; every other entry (shape records, ...) must be identical and is kept once."""
    if not payloads:
        raise ValueError("sum_payloads: no payloads")
    first = payloads[0]
    out = {}
    for name, t in first.items():
        if any(name not in p or p[name].shape != t.shape or p[name].dtype != t.dtype for p in payloads):
            raise ValueError(f"sum_payloads: entry {name!r} differs in name, shape or dtype between payloads")
        if t.is_floating_point() and t.numel() > 0:
            stacked = torch.stack([p[name] for p in payloads])
            out[name] = (stacked.sum(0) if weights is None
                         else torch.tensordot(weights.to(t.dtype), stacked, dims=1))
        elif any(not torch.equal(p[name], t) for p in payloads):
            raise ValueError(f"sum_payloads: non-data entry {name!r} differs between payloads")
        else:
            out[name] = t
    if any(set(p) != set(first) for p in payloads):
        raise ValueError("sum_payloads: payloads have different entries")
    return out
