"""DP-SGD local training (Abadi et al. 2016) as a pure ``ClientUpdate``.

Each local step ``s``:

1. Poisson-sample the client's records with rate ``q``: a record in slot ``i`` takes part iff
   ``mask[s, i]`` (and, when ``batches["poisson_u"]`` is given, ``poisson_u[s, i] < q``);
2. per-sample gradients of the cross-entropy, each clipped to L2 norm ``clip``
   (ghost clipping for ``nn.Linear`` stacks, else ``vmap(grad)``, ``atoll.privacy.ghost``);
   with ``norm="linf"`` each coordinate is clamped to ``[-clip, clip]`` instead (materialised
   gradients; the L2 sensitivity is then ``clip * sqrt(d)`` for ``d`` parameters);
3. add ``N(0, (noise_multiplier * sensitivity)^2)`` to the *sum* of clipped gradients;
4. divide by the expected batch size ``q * n_records`` (``batches["records"][s]``, else the
   number of valid slots ``mask[s].sum()``) and apply the local ``Transform``.

Each step is ``poisson_gaussian(q, noise_multiplier)`` on the client's records (``step_event``).

Two ways to feed the sampling (both exact Poisson sampling):

* ``poisson_batches(x, y, steps, q, key)`` draws the subsets up front and gathers them into
  padded ``(S, cap, ...)`` batches (``mask`` marks the sampled records, ``records`` = n);
* or pass every record in every step and let ``poisson_u`` (``dp_inputs(..., poisson=True)``)
  select them inside (costs a gradient for every record).

Randomness and ``vmap``. ``torch.Generator`` draws cannot run inside ``vmap``; so Poisson
uniforms and Gaussian noise are *tensors*: ``dp_inputs(batches, params, key)`` adds
``noise/<param>`` ``(S, *shape)`` (and ``poisson_u``) drawn from ``key``. With a plain ``int``
key the update draws them itself in exactly the same way, so the loop runtime needs nothing;
a vectorised runtime calls ``dp_inputs`` per client before stacking and then
``vmap(update)`` over clients works (vmap over clients of vmap over samples): loop == vmap.
In deployment ``key`` is secret to the client (``rng.private_key`` with the client's secret, drawn
by ``deploy.Client``), or the server could regenerate the noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from atoll import rng
from atoll.privacy import ghost
from atoll.tree import Tree
from atoll.types import GradFn


def dp_gradients(model: torch.nn.Module, clip: float, noise_multiplier: float,
                 sample_rate: float, use_ghost: bool | None = None, norm: str = "l2"):
    """The DP-SGD gradient estimator ``(params, step) -> (grads, loss, {})`` for
    ``client.run_steps``: per-sample gradients clipped, their sum noised from the step's
    pre-drawn ``noise/<param>``, divided by the expected batch ``q * records``. Any client step
    loop that takes an estimator (``local_training``, SCAFFOLD's, FedaGrac's) becomes DP-SGD
    with it. ``use_ghost``: ``None`` = when the model allows it, ``True`` = require it, ``False``
    = always materialise (the oracle). ``norm``: ``"l2"`` (ball of radius ``clip``) or ``"linf"``."""
    if not (clip > 0 and noise_multiplier >= 0 and 0 < sample_rate <= 1):
        raise ValueError(f"dp_local_training: need clip > 0, noise_multiplier >= 0, 0 < q <= 1; got "
                         f"clip={clip}, noise_multiplier={noise_multiplier}, q={sample_rate}")
    if norm not in ("l2", "linf"):
        raise ValueError(f"dp_local_training: norm must be 'l2' or 'linf', got {norm!r}")
    stack = ghost.linear_stack(model) if use_ghost is not False and norm == "l2" else None
    if use_ghost and stack is None:
        raise ValueError("dp_local_training: ghost clipping needs L2 clipping and nn.Sequential "
                         "of nn.Linear and parameter-free layers")
    sum_fn = (_linf_sum(model, clip) if norm == "linf" else
              _ghost_sum(stack, clip) if stack is not None else _vmap_sum(model, clip))
    dim = sum(p.numel() for p in model.parameters())
    std = noise_multiplier * clip * (dim ** 0.5 if norm == "linf" else 1.0)

    def estimate(p, step):
        dtype = next(iter(p.values())).dtype
        missing = [k for k in p if "noise/" + k not in step]
        if missing:
            raise ValueError("DP-SGD: the step has no pre-drawn noise for "
                             f"{missing[:3]} (draw the batches with privacy.dpsgd.dp_inputs)")
        sel = step["mask"]
        if "poisson_u" in step:
            sel = sel & (step["poisson_u"] < sample_rate)
        total, losses = sum_fn(p, step["x"], step["y"], sel.to(dtype))
        records = step["records"] if "records" in step else step["mask"].sum()
        denom = sample_rate * records.to(dtype).clamp(min=1.0)
        grads = {k: (total[k] + std * step["noise/" + k].to(dtype)) / denom for k in p}
        # run_steps weighs the loss by mask.sum(): this makes it the selected records' sum
        loss = (losses.detach() * sel.to(dtype)).sum() / step["mask"].sum().to(dtype).clamp(min=1.0)
        return grads, loss, {}

    return GradFn(estimate)


@dataclass(frozen=True)
class DpEstimator:
    """``Algorithm.estimator`` for DP-SGD: ``estimator(loss_fn)`` is the ``dp_gradients``
    estimator (it computes its own per-sample losses), and ``event`` is one step's privacy event,
    by which a deployed client knows its noise must come from its own secret."""

    grad_fn: Any
    event: Any

    def __call__(self, loss_fn):
        return self.grad_fn


def _vmap_sum(model, clip):
    def fn(p, x, y, sel):
        g = ghost.per_sample_grads(model, p, x, y)
        factors = sel * torch.clamp(clip / ghost.norms_of(g).clamp(min=1e-30), max=1.0)
        return ghost.weighted_sum(g, factors), ghost.per_sample_losses(model, p, x, y).detach()
    return fn


def _linf_sum(model, clip):
    def fn(p, x, y, sel):
        g, losses = ghost.per_sample(model, p, x, y)
        clipped = {k: v.clamp(-clip, clip) for k, v in g.items()}
        return ghost.weighted_sum(clipped, sel), losses
    return fn


def _ghost_sum(stack, clip):
    def fn(p, x, y, sel):
        losses, inputs, outgrads = ghost.ghost_forward(stack, p, x, y)
        norms = ghost.ghost_norms(inputs, outgrads)
        factors = sel * torch.clamp(clip / norms.clamp(min=1e-30), max=1.0)
        return ghost.ghost_weighted_sum(stack, inputs, outgrads, factors), losses
    return fn


def dp_inputs(batches: dict[str, torch.Tensor], params: Tree, key: int,
              poisson: bool = False) -> dict[str, torch.Tensor]:
    """``batches`` plus pre-drawn ``noise/<param>`` ``(S, *shape)`` standard normals and, with
    ``poisson=True``, ``poisson_u`` ``(S, B)`` uniforms; all from ``key``, in a fixed order."""
    g = rng.generator(rng.fold(int(key), "dpsgd"))
    s, b = batches["y"].shape[:2]
    out = dict(batches)
    if poisson:
        out["poisson_u"] = torch.rand((s, b), generator=g, dtype=torch.float64)
    for k, v in params.items():
        out["noise/" + k] = torch.randn((s, *v.shape), generator=g, dtype=torch.float64).to(v.dtype)
    return out


def with_inputs(batches, params, key):
    if all("noise/" + k in batches for k in params):
        return batches
    if not isinstance(key, int):
        raise ValueError("dp_local_training under vmap: pre-draw the noise with "
                         "atoll.privacy.dpsgd.dp_inputs(batches, params, key) per client")
    return dp_inputs(batches, params, key)


def poisson_batches(x: torch.Tensor, y: torch.Tensor, steps: int, q: float,
                    key: int) -> dict[str, torch.Tensor]:
    """Exact Poisson sampling: each step keeps every record independently with probability
    ``q``; the kept records are gathered into ``(S, cap, ...)`` slots (``cap`` = the largest
    sample, at least 1), ``mask`` marks real ones, ``records`` = n for the normaliser."""
    n = y.shape[0]
    g = rng.generator(rng.fold(int(key), "poisson"))
    keep = torch.rand((steps, n), generator=g, dtype=torch.float64) < q  # (S, n)
    cap = max(1, int(keep.sum(1).max()))
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :cap]  # kept first
    mask = torch.gather(keep, 1, order)
    return {"x": x[order], "y": y[order], "mask": mask,
            "records": torch.full((steps,), float(n), dtype=torch.float64)}
