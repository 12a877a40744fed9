"""The client and server halves of the private training modes (``privacy_config`` wires them
from ``[privacy]``; docs/privacy.md).

* DP-SGD: the gradient estimator ``privacy.dpsgd.dp_gradients`` (``Algorithm.estimator``)
  and ``dp_sgd_draw``, its Poisson batches with pre-drawn noise (``Algorithm.draw``), drawn
  outside the pure update so the vectorised runtime runs it under ``vmap``;
  ``dp_local_training``: a plain client half on that estimator.
* DP-FedAvg (McMahan et al. 2018): ``clipping_client`` clips each update to L2
  ``broadcast["dp"]["clip"]``; ``dp_fedavg_server`` adds Gaussian noise to the sum, divides by
  the expected cohort and, optionally, adapts the clip (Andrew et al. 2021).
* DP intrinsic quantization (US 11,017,322 B1, FIG. 4): ``intrinsic_client`` computes one
  clipped-gradient mean per round over a Poisson sample of records; ``intrinsic_server`` sums the
  clients' integers and removes the dithers from their seeds.
"""
from __future__ import annotations

import math

import torch

from atoll import rng
from atoll import tree as T
from atoll.client import local_training
from atoll.codecs.intrinsic import COUNT_KEY, SEED_KEY, dither
from atoll.privacy import ghost
from atoll.privacy.dpsgd import with_inputs, dp_gradients, dp_inputs, poisson_batches
from atoll.transforms.base import Transform
from atoll.sampling import straggler_steps
from atoll.types import ClientResult


def dp_local_training(model, transform: Transform, clip: float, noise_multiplier: float,
                      sample_rate: float, use_ghost: bool | None = None, norm: str = "l2"):
    """The DP-SGD ``ClientUpdate``: ``local_training`` on the ``dp_gradients`` estimator. With a
    plain ``int`` key it draws the step noise itself when the batches lack it."""
    estimate = dp_gradients(model, clip, noise_multiplier, sample_rate, use_ghost, norm)
    inner = local_training(None, transform, estimate)

    def update(params, client_state, broadcast, batches, step_mask, key) -> ClientResult:
        return inner(params, client_state, broadcast, with_inputs(batches, params, key),
                     step_mask, key)

    return update


def dp_sgd_draw(q, steps):
    """DP-SGD's batches: ``steps`` Poisson samples of the client's records at rate ``q``, with
    the step noise pre-drawn (from the client's key: its secret in deployment)."""

    def draw(x, y, cid, r, seed, work, params, secret=None):
        key = rng.private_key(seed, r, cid, "client", secret)  # the key the update gets
        batches = dp_inputs(poisson_batches(x, y, steps, q, key), params, key)
        k, straggler = straggler_steps(cid, r, seed, work, steps)
        return batches, torch.arange(steps) < k, straggler

    return draw


def clipping_client(adaptive: bool, aux_ratio: float | None = None, client_fn=local_training):
    """``client_fn``'s update, then clipped to L2 ``broadcast["dp"]["clip"]``; its ``aux``
    (SCAFFOLD's, FedaGrac's) clipped to ``aux_ratio`` times that clip; with adaptive clipping
    also ``aux["dp_below"] = 1[norm <= clip] - 1/2``."""

    def build(loss_fn, local_opt, grad_fn=None):
        inner = client_fn(loss_fn, local_opt, grad_fn)

        def update(params, client_state, broadcast, batches, step_mask, key):
            res = inner(params, client_state, broadcast, batches, step_mask, key)
            clip = broadcast["dp"]["clip"][0]
            norm = T.norm(res.delta)
            aux = _clip(res.aux, aux_ratio * clip) if res.aux else {}
            if adaptive:
                aux["dp_below"] = (norm <= clip).to(norm.dtype) - 0.5
            return ClientResult(_clip(res.delta, clip), aux, res.client_state, res.metrics)

        return update

    return build


def _clip(tree: dict, clip) -> dict:
    factor = torch.clamp(clip / T.norm(tree).clamp(min=1e-30), max=1.0)
    return T.scale(tree, factor)


def dp_fedavg_server(expected: float, z_update: float, sigma_b: float | None,
                     quantile: float | None, clip_lr: float, reclip: bool = False,
                     aux_ratio: float | None = None, server_aux=None):
    """The DP-FedAvg ``server_fn``: noisy sum of the clipped deltas over ``expected`` clients;
    adaptive clipping moves ``clip`` by ``exp(-clip_lr * (noisy fraction below - quantile))``.
    ``reclip``: clip every decoded delta again (an uplink codec after the client's clip, e.g.
    a quantizer or a sketch, can raise its norm; the sum's sensitivity must stay ``clip``).

    With ``server_aux`` (an algorithm whose server reads the mean of its clients' aux), the
    aux rows are clipped again to ``aux_ratio * clip`` and summed with noise too. Rescaled by
    ``1 / aux_ratio``, the aux is a second part of norm at most ``clip``: the pair's sum has L2
    sensitivity ``clip * sqrt(2)``, so each part gets noise of ``sqrt(2) z`` times its own clip
    (its signal-to-noise ratio does not depend on ``aux_ratio``); ``server_aux`` then gets the
    noisy mean over ``expected`` clients."""
    scale = math.sqrt(2) if server_aux is not None else 1.0

    def server_fn(state, agg, deltas, weights, aux, key, extra):
        clip = extra["broadcast"]["dp"]["clip"]
        g = rng.generator(rng.fold(key, "dp_fedavg"))
        std = z_update * float(clip[0]) * scale
        if reclip:
            deltas = _clip_rows(deltas, float(clip[0]))
        out = _noisy_mean(deltas, std, expected, g)
        if quantile is not None:
            count = aux["dp_below"].to(torch.float64).sum() + sigma_b * torch.randn(
                (), generator=g, dtype=torch.float64)
            below = float(count) / expected + 0.5
            new = clip * math.exp(-clip_lr * (below - quantile))
            extra = {**extra, "broadcast": {**extra["broadcast"], "dp": {"clip": new}}}
        if server_aux is not None:
            rows = _clip_rows({k: v for k, v in aux.items() if k != "dp_below"},
                              aux_ratio * float(clip[0]))
            noisy = _noisy_mean(rows, std * aux_ratio, expected, g)
            out, extra = server_aux(state, out, noisy, expected, extra)
        return out, extra

    return server_fn


def _noisy_mean(rows: dict, std: float, expected: float, g) -> dict:
    out = {}
    for k, v in rows.items():
        noise = torch.randn(v.shape[1:], generator=g, dtype=torch.float64).to(v.dtype)
        out[k] = (v.sum(0) + std * noise) / expected
    return out


def _clip_rows(deltas: dict, clip: float) -> dict:
    """Each row (client) of the stacked ``deltas`` scaled to L2 norm at most ``clip``."""
    n = next(iter(deltas.values())).shape[0]
    norm = torch.cat([v.reshape(n, -1) for v in deltas.values()], 1).norm(dim=1)
    factor = torch.clamp(clip / norm.clamp(min=1e-30), max=1.0)
    return {k: v * factor.reshape(-1, *[1] * (v.dim() - 1)).to(v.dtype) for k, v in deltas.items()}


INTRINSIC_AUX = lambda params: {"dither_seed": ((), torch.int64, -math.inf, math.inf),  # noqa: E731
                                 "count": ((), torch.float64, 0.0, math.inf)}


def intrinsic_client(model, clip: float, q: float, norm: str):
    """FIG. 4 lines 3-4: ``g = sum_j CL(grad_j) / N_k`` over a Poisson sample of records, with
    the public normaliser ``N_k = q * n_k``; the dither seed and ``N_k`` travel in the tree (for
    the codec) and in ``aux`` (for the server's integer aggregation)."""

    def client_fn(loss_fn, local_opt, grad_fn=None):  # one per-sample gradient sum, no estimator
        def update(params, client_state, broadcast, batches, step_mask, key):
            x, y, sel = batches["x"][0], batches["y"][0], batches["mask"][0]
            dtype = next(iter(params.values())).dtype
            g, losses = ghost.per_sample(model, params, x, y)
            if norm == "linf":
                g = {k: v.clamp(-clip, clip) for k, v in g.items()}
                factors = sel.to(dtype)
            else:
                factors = sel.to(dtype) * torch.clamp(clip / ghost.norms_of(g).clamp(min=1e-30), max=1.0)
            count = (q * batches["records"][0]).to(torch.float64)
            total = ghost.weighted_sum(g, factors)
            mean = {k: v / count.to(dtype) for k, v in total.items()}
            seed = batches["dither_seed"]
            n = sel.to(dtype).sum()
            metrics = {"loss": (losses * sel.to(dtype)).sum() / n.clamp(min=1.0), "samples": n,
                       "steps": step_mask.sum()}
            return ClientResult({**mean, COUNT_KEY: count, SEED_KEY: seed},
                                {"dither_seed": seed, "count": count}, client_state, metrics)

        return update

    return client_fn


def intrinsic_draw(q: float):
    """FIG. 4's one Poisson sample of records per round (rate ``q``, from the client's key)
    and the dither seed (``Algorithm.draw``)."""

    def draw(x, y, cid, r, seed, work, params, secret=None):
        batches = poisson_batches(x, y, 1, q, rng.private_key(seed, r, cid, "client", secret))
        batches["dither_seed"] = torch.tensor(rng.key(seed, r, cid, "dither"), dtype=torch.int64)
        return batches, torch.ones(1, dtype=torch.bool), False

    return draw


def intrinsic_server(step: float, lr: float):
    """FIG. 4 lines 7-9 on integers: ``g = step * (sum_k m_k - sum_k u_k) / sum_k N_k``, where
    ``sum_k m_k`` is an int64 sum of the clients' integers (a secure sum would give exactly it)
    and ``u_k`` are the dithers regenerated from their seeds; the delta is ``-lr * g``."""

    def server_fn(state, agg, deltas, weights, aux, key, extra):
        names = list(state.params)
        c = deltas[names[0]].shape[0]
        m = torch.cat([deltas[k].reshape(c, -1) for k in names], 1).round().to(torch.int64)
        total_m = m.sum(0)  # integers only
        total_u = sum(dither(int(s), m.shape[1]) for s in aux["dither_seed"].tolist())
        g = step * (total_m.to(torch.float64) - total_u) / aux["count"].to(torch.float64).sum()
        out = T.unflatten(-lr * g, {k: state.params[k] for k in names})
        return {k: v.to(state.params[k].dtype) for k, v in out.items()}, extra

    return server_fn
