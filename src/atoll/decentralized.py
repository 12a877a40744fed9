"""Decentralized training without a server: gossip averaging, push-sum and D-PSGD.

Every node keeps its own model; a round is local work followed by one exchange with the node's
neighbours, ``X <- W X`` over the stacked ``(n, D)`` node vectors. Topologies are mixing
matrices:

- undirected graphs (``ring``, ``torus``, ``random_regular``) get Metropolis-Hastings weights
  ``W_ij = 1 / (1 + max(deg_i, deg_j))``: symmetric and doubly stochastic, so gossip converges
  to the exact average (Xiao & Boyd 2004);
- directed graphs (``directed_ring``, the time-varying one-peer ``exponential`` graph) are only
  column-stochastic (each node splits what it holds among itself and its out-neighbours); plain
  gossip would drift there, so ``push_sum`` carries a weight beside each value and reads
  ``x / w`` (Kempe et al. 2003; Nedic & Olshevsky 2016; Assran et al. 2019, SGP).

``clipped`` (ClippedGossip, He et al. 2022) bounds what b Byzantine neighbours move a node.

``dpsgd`` (Lian et al. 2017) trains a model on a ``FederatedData`` split: each node runs
``local_steps`` SGD steps on its own data (all nodes at once, ``torch.func.vmap``), then mixes.
A node sends its model to each out-neighbour once a round: ``degree x d x 4`` bytes (float32).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call, vmap

from atoll import rng

Topology = Callable[[int], torch.Tensor]  # round -> (n, n) mixing matrix


def metropolis(adj: np.ndarray) -> torch.Tensor:
    """Doubly stochastic weights of an undirected graph (symmetric 0/1 adjacency, no self loops)."""
    a = np.asarray(adj, dtype=bool)
    if (a != a.T).any() or a.diagonal().any():
        raise ValueError("metropolis: the adjacency must be symmetric without self loops")
    deg = a.sum(1)
    w = np.where(a, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    w[np.diag_indices_from(w)] = 1.0 - w.sum(1)
    return torch.tensor(w, dtype=torch.float64)


def ring(n: int) -> torch.Tensor:
    a = np.zeros((n, n), dtype=bool)
    for i in range(n):
        a[i, (i + 1) % n] = a[(i + 1) % n, i] = n > 1
    return metropolis(a)


def torus(rows: int, cols: int) -> torch.Tensor:
    n, a = rows * cols, np.zeros((rows * cols, rows * cols), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for j in (((r + 1) % rows) * cols + c, r * cols + (c + 1) % cols):
                if j != i:
                    a[i, j] = a[j, i] = True
    return metropolis(a)


def random_regular(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A random k-regular graph: the union of k/2 random Hamiltonian cycles without repeated
    edges (k even, k < n), redrawn until no edge repeats."""
    if k % 2 or not 0 < k < n:
        raise ValueError(f"random_regular: k must be even and in (0, {n}), got {k}")
    g = np.random.default_rng(rng.key(seed, 0, rng.SERVER, "topology"))
    for _ in range(1000):
        a = np.zeros((n, n), dtype=bool)
        ok = True
        for _ in range(k // 2):
            p = g.permutation(n)
            for i in range(n):
                u, v = p[i], p[(i + 1) % n]
                ok &= not a[u, v]
                a[u, v] = a[v, u] = True
        if ok:
            return metropolis(a)
    raise ValueError(f"random_regular: no simple {k}-regular union of cycles found for n={n}")


def directed_ring(n: int) -> torch.Tensor:
    """Column-stochastic: node j keeps half of what it holds and sends half to node j + 1."""
    p = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n):
        p[j, j] += 0.5
        p[(j + 1) % n, j] += 0.5
    return p


def exponential(n: int) -> Topology:
    """Time-varying one-peer exponential graph: at round r node j sends half to j + 2^(r mod log2 n)."""
    hops = max(1, math.ceil(math.log2(n)))

    def at(r: int) -> torch.Tensor:
        p = torch.zeros(n, n, dtype=torch.float64)
        step = 2 ** (r % hops)
        for j in range(n):
            p[j, j] += 0.5
            p[(j + step) % n, j] += 0.5
        return p

    return at


def static(w: torch.Tensor) -> Topology:
    return lambda r: w


def gossip(x: torch.Tensor, topology: Topology, rounds: int, *, byzantine: int | None = None) -> torch.Tensor:
    """``rounds`` of ``X <- W_r X`` over ``(n, D)`` node values; with ``byzantine = b``,
    ClippedGossip's ``X <- A_r X`` (``clipped``)."""
    for r in range(rounds):
        m = topology(r).to(x.dtype)
        x = (m if byzantine is None else clipped(m, {"x": x}, byzantine)) @ x
    return x


def clip_factors(dist: torch.Tensor, b: int) -> torch.Tensor:
    """ClippedGossip's factors ``min(1, tau / d_k)`` for the distances ``d_k`` (float64) from a
    node to the in-neighbours it heard, ``tau`` the (b + 1)-th largest of them: the b farthest are
    pulled in to ``tau``, so b Byzantine neighbours move the node by at most what its farthest
    honest one does. Fewer than b + 1 heard: ``tau = 0`` (any of them may lie: keep its own)."""
    if not isinstance(b, int) or b < 0:
        raise ValueError(f"byzantine must be an integer >= 0, got {b!r}")
    if b == 0:
        return torch.ones_like(dist)
    tau = torch.sort(dist, descending=True).values[b] if dist.numel() > b else dist.new_zeros(())
    return torch.where(dist > tau, tau / torch.where(dist > 0, dist, 1.0), 1.0)


def distances(x: dict, me: dict) -> torch.Tensor:
    """Euclidean distances over every entry between ``x`` (rows ``(k, ...)`` per entry) and
    ``me`` (one node's entries), in float64."""
    sq = sum(((v.to(torch.float64) - me[k].to(torch.float64)) ** 2).flatten(1).sum(1) for k, v in x.items())
    return torch.sqrt(sq)


def clipped(m: torch.Tensor, x: dict, b: int) -> torch.Tensor:
    """ClippedGossip (He, Karimireddy & Jaggi 2022, "Byzantine-robust Decentralized Learning via
    ClippedGossip"): ``x_i <- x_i + sum_k m_ik clip(x_k - x_i, tau_i)``, written as the matrix
    ``A`` with ``A_ik = m_ik s_ik`` and ``A_ii = m_ii + sum_k m_ik (1 - s_ik)`` (``s`` from
    ``clip_factors``; ``b = 0``: ``A = m``). ``x``: the nodes' entries, rows ``(n, ...)``."""
    a = m.clone()
    for i in range(m.shape[0]):
        nbrs = [k for k in range(m.shape[0]) if k != i and float(m[i, k]) != 0.0]
        if not nbrs:
            continue
        s = clip_factors(distances({k: v[nbrs] for k, v in x.items()}, {k: v[i] for k, v in x.items()}), b)
        w = m[i, nbrs]
        a[i, nbrs] = w * s.to(m.dtype)
        a[i, i] = m[i, i] + (w * (1 - s.to(m.dtype))).sum()
    return a


def push_sum(x: torch.Tensor, topology: Topology, rounds: int) -> torch.Tensor:
    """Push-sum over column-stochastic ``P_r``: ``x <- P x``, ``w <- P w``; returns ``x / w``."""
    w = torch.ones(x.shape[0], 1, dtype=x.dtype)
    for r in range(rounds):
        p = topology(r).to(x.dtype)
        x, w = p @ x, p @ w
    return x / w


def out_degree(w: torch.Tensor) -> torch.Tensor:
    """Out-neighbours per node (column j's nonzero off-diagonal entries)."""
    off = w.clone()
    off.fill_diagonal_(0)
    return (off != 0).sum(0)


def dpsgd(model: torch.nn.Module, data, topology: Topology, rounds: int, *, lr: float = 0.1,
          batch_size: int = 32, local_steps: int = 1, seed: int = 0, push: bool = False,
          eval_every: int = 0, on_eval=None, byzantine: int | None = None) -> dict[str, torch.Tensor]:
    """D-PSGD: every node starts from the same model, runs ``local_steps`` SGD steps on its own
    data, then mixes with its neighbours (push-sum weights when ``push``; ClippedGossip against
    ``byzantine`` neighbours per node, gossip only). Returns the nodes' average model (what
    ``on_eval(round, params)`` also receives every ``eval_every`` rounds)."""
    if push and byzantine is not None:
        raise ValueError("byzantine (ClippedGossip) needs gossip weights, not push-sum")
    names = [k for k, _ in model.named_parameters()]
    base = {k: v.detach() for k, v in model.named_parameters()}
    n = len(data.clients)
    x = {k: v.unsqueeze(0).repeat(n, *[1] * v.dim()).clone() for k, v in base.items()}  # (n, ...)
    w = torch.ones(n, dtype=next(iter(base.values())).dtype)

    forward = vmap(lambda p, xb: functional_call(model, p, (xb,)))

    def step(params, xb, yb):  # per-node gradients: the nodes' losses are independent, so the
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}  # sum's gradient
        logits = forward(leaves, xb)  # (n, B, classes)                           # is theirs
        total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum")
        grads = torch.autograd.grad(total / yb.shape[1], list(leaves.values()))
        return dict(zip(leaves, grads))
    sizes = torch.tensor([c.n for c in data.clients])
    first = torch.cumsum(sizes, 0) - sizes  # (n,) each node's first row in the pooled data
    xs, ys = torch.cat([c.x for c in data.clients]), torch.cat([c.y for c in data.clients])
    for r in range(rounds):
        for s in range(local_steps):
            g = rng.generator(rng.key(seed, r, s, "dpsgd-batches"))
            idx = first[:, None] + (torch.rand(n, batch_size, generator=g) * sizes[:, None]).long()
            xb, yb = xs[idx], ys[idx]  # (n, B, F), (n, B): batches drawn with replacement
            est = {k: v / w.view(-1, *[1] * (v.dim() - 1)) for k, v in x.items()} if push else x
            grads = step(est, xb, yb)
            x = {k: x[k] - lr * grads[k] * (w.view(-1, *[1] * (x[k].dim() - 1)) if push else 1) for k in names}
        mix = topology(r).to(w.dtype)
        mix = mix if byzantine is None else clipped(mix, x, byzantine)
        x = {k: torch.tensordot(mix, v, dims=1) for k, v in x.items()}
        if push:
            w = mix @ w
        if on_eval and eval_every and (r + 1) % eval_every == 0:
            on_eval(r + 1, average(x, w if push else None))
    return average(x, w if push else None)


def average(x: dict, w: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if w is None:
        return {k: v.mean(0) for k, v in x.items()}
    return {k: (v / w.view(-1, *[1] * (v.dim() - 1))).mean(0) for k, v in x.items()}
