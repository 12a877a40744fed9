"""Privacy in training runs: the ``[privacy]`` modes, their per-round events, the budget.

``configure(cfg, algorithm, model, data, plan)`` (called by ``config.build``) checks the
``[privacy]`` section against the rest of the config and returns the algorithm with its private
parts and the plan with a :class:`PrivacySpec`. ``simulate`` then asks the spec for a
:class:`Driver`, which checks every round's events against ``target_epsilon`` *before* the round
runs, charges them after it, and keeps the accountant in ``state.extra[STATE_KEY]`` (so it is in
every checkpoint and a resumed run keeps its spent budget).

Modes (``privacy.mode``), each declaring its event per round:

* ``dp_sgd``: record-level DP-SGD inside each client (``privacy.dpsgd``): ``S`` steps of
  ``poisson_gaussian(sample_rate, z)``. Poisson batches and noise are drawn outside the pure
  update (``draw_batches``), so the vectorised runtime runs it under ``vmap``.
* ``dp_fedavg``: client-level DP-FedAvg (McMahan et al. 2018): each client clips its update to
  L2 ``clip``; Poisson client sampling at ``sampling.rate``; the server adds
  ``N(0, (z_update * clip)^2)`` to the *sum* and divides by the expected cohort ``rate * K``;
  optional adaptive clipping to ``target_quantile`` (Andrew et al. 2021, geometric update, noisy
  count with std ``clip_count_stddev``; ``z`` is then the effective multiplier of both).
  Event: ``poisson_gaussian(rate, z)``.
* ``local``: local DP on the uplink: ``clip_l2(clip)`` then Gaussian noise of std
  ``z * 2 * clip`` (any two inputs of a client differ by at most ``2 * clip``). Event:
  ``gaussian(z)``.
* ``intrinsic``: DP intrinsic quantization (US 11,017,322 B1, FIG. 4): one clipped-gradient mean
  per round over a Poisson sample of records, quantized by ``dithered_quantize``; the server sums
  the *integers* (what secure aggregation would reveal), removes the dithers from their seeds and
  steps ``w -= lr * g``. Event: ``intrinsic_quantization(Z + 1, step, clip, d, sample_rate)``.

Every round is charged in full, whichever clients took part (no amplification by client
sampling is claimed except in ``dp_fedavg``, whose unit is the client).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from atoll import rng
from atoll import tree as T
from atoll.client import buffer_names, local_training
from atoll.codecs import chain, clip_l1, clip_l2, dithered_quantize, gaussian_noise, laplace_noise
from atoll.codecs.intrinsic import COUNT_KEY, SEED_KEY, dither
from atoll.codecs.quantize import stochastic_quantize
from atoll.privacy import events as ev
from atoll.privacy import ghost
from atoll.privacy.accountant import Accountant
from atoll.privacy.calibrate import noise_for_epsilon, step_event, steps_for_epochs
from atoll.privacy.irwin_hall import delta_floor
from atoll.privacy.dpsgd import DpEstimator, dp_gradients, dp_inputs, poisson_batches
from atoll.runtime.base import straggler_steps
from atoll.types import ClientResult, ServerState

STATE_KEY = "privacy_accountant"  # where the accountant's state lives in ServerState.extra
UNITS = {"dp_sgd": "record", "intrinsic": "record", "dp_fedavg": "client",
         "local": "client (local DP: any two inputs of one client)"}


@dataclass(frozen=True)
class PrivacySpec:
    """What a private run declares: its events per round and its budget."""

    mode: str
    events: tuple  # ((DpEvent, count), ...) charged for every round
    accountant: str = "pld"
    neighboring: str = "add_remove"
    delta: float = 1e-5
    target_epsilon: float | None = None
    details: dict = field(default_factory=dict)

    def driver(self, state: ServerState | None = None) -> Driver:
        return Driver(self, state)


class Driver:
    """Charges a run's rounds to its accountant; stops before a round that would exceed the
    target. The accountant is rebuilt from ``state.extra[STATE_KEY]`` when resuming."""

    def __init__(self, spec: PrivacySpec, state: ServerState | None = None):
        self.spec = spec
        saved = state.extra.get(STATE_KEY) if state is not None else None
        self.acc = (Accountant.from_state(saved) if saved is not None
                    else Accountant(spec.accountant, spec.neighboring))
        self.epsilon = self.acc.epsilon(spec.delta) if self.acc.events else 0.0
        self.stopped: str | None = None
        self._next = None

    def before_round(self, r: int, what: str = "round") -> str | None:
        """None to go on; else why ``what`` ``r`` (a round; for the asynchronous scheduler a
        client's ``r``-th participation) must not run (also kept in ``stopped``)."""
        self._next = self.acc.epsilon_after(list(self.spec.events), self.spec.delta)
        target = self.spec.target_epsilon
        if target is not None and self._next > target:
            self.stopped = (f"privacy budget: {what} {r} would raise epsilon from "
                            f"{self.epsilon:.4g} to {self._next:.4g} > target_epsilon {target:g} "
                            f"(delta {self.spec.delta:g}); stopped after {what} {r - 1}")
        return self.stopped

    def charge(self) -> None:
        """Charge one round's events (after ``before_round`` allowed them)."""
        for event, count in self.spec.events:
            self.acc.step(event, count)
        self.epsilon = self._next

    def after_round(self, state: ServerState, charge: bool = True) -> tuple[ServerState, dict]:
        """Charge the round (unless ``charge`` is False: the scheduler charged already); the
        new state (accountant inside) and the metrics to log."""
        if charge:
            self.charge()
        state = ServerState(state.params, state.opt_state, state.round,
                            {**state.extra, STATE_KEY: self.acc.state()})
        line = {"epsilon": self.epsilon}
        clip = state.extra.get("broadcast", {}).get("dp", {}).get("clip")
        if clip is not None and self.spec.details.get("adaptive"):
            line["clip"] = float(clip[0])
        return state, line

    def summary(self) -> dict:
        """Run metadata for ``final.json``: how each epsilon was obtained."""
        return {"mode": self.spec.mode, "unit": UNITS[self.spec.mode], "epsilon": self.epsilon,
                "delta": self.spec.delta, "target_epsilon": self.spec.target_epsilon,
                "accountant": self.acc.kind, "neighboring": self.acc.neighboring,
                "conversion": self.acc.describe(), "stopped": self.stopped,
                "events_per_round": [[repr(e), c] for e, c in self.spec.events],
                **self.spec.details}


# ----------------------------------------------------------------------------- configure
def configure(cfg, algorithm, model, data, plan):
    """``(algorithm, plan)`` with the privacy mode of ``cfg.privacy`` wired in (or unchanged
    for ``mode = "none"``); a ``ConfigError`` naming the keys for inconsistent settings."""
    from atoll.config import ConfigError

    p = cfg.privacy
    if p.mode == "none":
        given = [k for k in ("target_epsilon", "noise_multiplier", "sample_rate", "step",
                             "target_quantile", "quantize_bits") if getattr(p, k) is not None]
        if p.mechanism != "gaussian":
            given.append("mechanism")
        if given:
            raise ConfigError(f"privacy.{given[0]} is set but privacy.mode is \"none\"; choose a "
                              "mode: dp_sgd, dp_fedavg, local or intrinsic")
        return algorithm, plan
    if p.mechanism != "gaussian" and p.mode != "local":
        raise ConfigError(f"privacy.mechanism = {p.mechanism!r} applies to mode \"local\" only "
                          f"(mode {p.mode!r} adds Gaussian noise or the quantizer's)")
    if p.norm == "l1" and p.mode != "local":
        raise ConfigError(f"privacy.norm = \"l1\" applies to mode \"local\" with the Laplace "
                          f"mechanism only, not to mode {p.mode!r}")
    names = buffer_names(model)
    if p.mode in ("dp_sgd", "intrinsic") and names:
        raise ConfigError(f"privacy.mode = {p.mode!r} clips each sample's gradient, but model "
                          f"{type(model).__name__} has buffers {list(names[:3])} (BatchNorm's "
                          "running statistics mix the samples of a batch and are not clipped): "
                          "use GroupNorm/LayerNorm, or mode dp_fedavg or local, which clip and "
                          "noise the whole update, buffers included")
    try:
        algorithm, plan, events, details = _MODES[p.mode](cfg, algorithm, model, data, plan)
        spec = PrivacySpec(p.mode, tuple(events), p.accountant, p.neighboring, p.delta,
                           p.target_epsilon, details)
        probe = Accountant(p.accountant, p.neighboring)
        for event, count in events:
            probe.step(event, count)  # refuses events this accountant cannot compose
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"[privacy] mode {p.mode!r}: {exc}") from None
    return algorithm, dataclasses.replace(plan, privacy=spec)


def _err(msg: str):
    from atoll.config import ConfigError

    return ConfigError(msg)


def _own_parts(algorithm, mode: str, uplink: bool = False) -> None:
    """Refuse, with the reason, an algorithm this privacy mode cannot protect or account.

    Every mode but ``intrinsic`` composes with a compressed uplink (compression after the
    noise is post-processing; ``dp_fedavg``'s server re-clips what it decodes). ``dp_sgd``
    composes with every client half (it is the gradient estimator they all step on, so what
    they send, ``aux`` included, is post-processing of DP-SGD's releases). What does not
    compose with the other modes: an algorithm whose clients send ``aux`` (SCAFFOLD's control
    variates, FedaGrac's gradients, FedNova's step counts), which they neither clip nor noise;
    and a second client or server function where the mode brings its own."""
    if algorithm.estimator is not None or algorithm.draw is not None:
        raise _err(f"privacy.mode = {mode!r}: algorithm {algorithm.name!r} already has its own "
                   "gradient estimator or batch draw")
    if mode == "dp_sgd":
        return
    probe = {"w": torch.zeros(1)}
    aux = sorted(algorithm.aux_spec(probe))
    if aux:
        raise _err(f"privacy.mode = {mode!r} cannot protect algorithm {algorithm.name!r}: its "
                   f"clients also send {aux} (aux), which the mode neither clips nor noises, "
                   "so no epsilon would cover it; use fedavg, fedprox or fedadam/fedyogi")
    if algorithm.client_fn is not local_training or algorithm.server_fn is not None:
        raise _err(f"privacy.mode = {mode!r} replaces the client/server functions, but algorithm "
                   f"{algorithm.name!r} brings its own")
    if uplink and algorithm.uplink.name != "identity":
        raise _err(f"privacy.mode = {mode!r} is itself the uplink codec (its quantizer is the "
                   f"noise), so it cannot run with comm.uplink = {algorithm.uplink.name!r}")


def _after(codec, algorithm):
    """``codec`` followed by the algorithm's own uplink (compression after the noise)."""
    return codec if algorithm.uplink.name == "identity" else chain(codec, algorithm.uplink)


def _noise(cfg, q: float, steps: int) -> tuple[float, bool]:
    """``(noise multiplier, calibrated?)``: the configured one, or the smallest that keeps the
    whole run (``rounds`` x ``steps`` Poisson-Gaussian steps) within ``target_epsilon``."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier, False
    if p.target_epsilon is None:
        raise _err(f"privacy.mode = {p.mode!r} needs privacy.noise_multiplier, or "
                   "privacy.target_epsilon to calibrate it for the whole run")
    if p.accountant == "rdp_classic":
        raise _err("privacy.noise_multiplier cannot be calibrated with accountant rdp_classic; "
                   "give it, or use accountant pld or rdp")
    return noise_for_epsilon(p.target_epsilon, q, steps, p.delta, p.accountant,
                             neighboring=p.neighboring, mechanism=p.mechanism), True


def _dp_sgd(cfg, algorithm, model, data, plan):
    p = cfg.privacy
    _own_parts(algorithm, "dp_sgd")
    if p.sample_rate is None:
        raise _err("privacy.mode = \"dp_sgd\" needs privacy.sample_rate: the Poisson rate at "
                   "which each local step samples the client's records")
    if p.target_quantile is not None:
        raise _err("privacy.target_quantile (adaptive clipping) belongs to mode \"dp_fedavg\"")
    q, norm = p.sample_rate, p.norm or "l2"
    steps = cfg.client.steps or steps_for_epochs(cfg.client.epochs, q)  # epochs in expectation
    z, calibrated = _noise(cfg, q, cfg.rounds * steps)
    estimator = dp_gradients(model, p.clip, z, q, norm=norm)
    parts = {"estimator": DpEstimator(estimator, step_event(q, z)), "draw": _dp_sgd_draw(q, steps)}
    if p.quantize_bits is not None:
        parts["uplink"] = _after(stochastic_quantize(p.quantize_bits, bucket=_WHOLE), algorithm)
    algorithm = dataclasses.replace(algorithm, **parts)
    work = dataclasses.replace(plan.work, steps=steps, epochs=None)
    details = {"noise_multiplier": z, "calibrated": calibrated, "clip": p.clip, "norm": norm,
               "sample_rate": q, "local_steps": steps}
    return algorithm, dataclasses.replace(plan, work=work), [(step_event(q, z), steps)], details


def _dp_sgd_draw(q, steps):
    """DP-SGD's batches: ``steps`` Poisson samples of the client's records at rate ``q``, with
    the step noise pre-drawn (from the client's key: its secret in deployment)."""

    def draw(x, y, cid, r, seed, work, params, secret=None):
        key = rng.private_key(seed, r, cid, "client", secret)  # the key the update gets
        batches = dp_inputs(poisson_batches(x, y, steps, q, key), params, key)
        k, straggler = straggler_steps(cid, r, seed, work, steps)
        return batches, torch.arange(steps) < k, straggler

    return draw


def _dp_fedavg(cfg, algorithm, model, data, plan):
    p, s = cfg.privacy, cfg.sampling
    _own_parts(algorithm, "dp_fedavg")
    if s.method != "poisson" or s.rate is None:
        raise _err("privacy.mode = \"dp_fedavg\" needs sampling.method = \"poisson\" and "
                   "sampling.rate: its accounting (Poisson-subsampled Gaussian) assumes every "
                   "client joins each round independently with probability sampling.rate; "
                   f"got sampling.method = {s.method!r}, rate = {s.rate}")
    if p.sample_rate is not None or p.quantize_bits is not None:
        raise _err("privacy.sample_rate / privacy.quantize_bits do not apply to mode "
                   "\"dp_fedavg\" (clients are sampled with sampling.rate; the server needs the "
                   "clipped updates exactly)")
    if (p.norm or "l2") != "l2":
        raise _err("privacy.norm: dp_fedavg clips client updates in L2")
    z, calibrated = _noise(cfg, s.rate, cfg.rounds)
    m = s.rate * len(data.clients)  # expected cohort: the fixed denominator
    adaptive = p.target_quantile is not None
    z_update, sigma_b = z, None
    if adaptive:
        sigma_b = p.clip_count_stddev if p.clip_count_stddev is not None else m / 20
        if not 2 * sigma_b > z:
            raise _err(f"privacy.clip_count_stddev = {sigma_b:g} is too small for "
                       f"noise_multiplier {z:g}: adaptive clipping needs 2 * stddev > "
                       "noise_multiplier (Andrew et al. 2021, Thm 1)")
        z_update = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5 if z > 0 else 0.0
    algorithm = dataclasses.replace(
        algorithm, client_fn=_clipping_client(adaptive),
        aux_spec=lambda params: {"dp_below": ((), None, -0.5, 0.5)} if adaptive else {},
        server_init=lambda params: {"broadcast": {"dp": {"clip": torch.tensor(
            [p.clip], dtype=next(iter(params.values())).dtype)}}},
        server_fn=dp_fedavg_server(m, z_update, sigma_b, p.target_quantile, p.clip_lr,
                                   reclip=algorithm.uplink.name != "identity"))
    details = {"noise_multiplier": z, "calibrated": calibrated, "update_noise_multiplier": z_update,
               "clip": p.clip, "adaptive": adaptive, "target_quantile": p.target_quantile,
               "clip_count_stddev": sigma_b, "expected_clients": m}
    return algorithm, plan, [(step_event(s.rate, z), 1)], details


def _clipping_client(adaptive: bool):
    """local_training, then the update clipped to L2 ``broadcast["dp"]["clip"]``; with
    adaptive clipping also ``aux["dp_below"] = 1[norm <= clip] - 1/2``."""

    def client_fn(loss_fn, local_opt, grad_fn=None):
        inner = local_training(loss_fn, local_opt, grad_fn)

        def update(params, client_state, broadcast, batches, step_mask, key):
            res = inner(params, client_state, broadcast, batches, step_mask, key)
            clip = broadcast["dp"]["clip"][0]
            norm = T.norm(res.delta)
            factor = torch.clamp(clip / norm.clamp(min=1e-30), max=1.0)
            aux = dict(res.aux)
            if adaptive:
                aux["dp_below"] = (norm <= clip).to(norm.dtype) - 0.5
            return ClientResult(T.scale(res.delta, factor), aux, res.client_state, res.metrics)

        return update

    return client_fn


def dp_fedavg_server(expected: float, z_update: float, sigma_b: float | None,
                     quantile: float | None, clip_lr: float, reclip: bool = False):
    """The DP-FedAvg ``server_fn``: noisy sum of the clipped deltas over ``expected`` clients;
    adaptive clipping moves ``clip`` by ``exp(-clip_lr * (noisy fraction below - quantile))``.
    ``reclip``: clip every decoded delta again (an uplink codec after the client's clip, e.g.
    a quantizer or a sketch, can raise its norm; the sum's sensitivity must stay ``clip``)."""

    def server_fn(state, agg, deltas, weights, aux, key, extra):
        clip = extra["broadcast"]["dp"]["clip"]
        g = rng.generator(rng.fold(key, "dp_fedavg"))
        std = z_update * float(clip[0])
        if reclip:
            deltas = _clip_rows(deltas, float(clip[0]))
        out = {}
        for k, v in deltas.items():
            noise = torch.randn(v.shape[1:], generator=g, dtype=torch.float64).to(v.dtype)
            out[k] = (v.sum(0) + std * noise) / expected
        if quantile is not None:
            count = aux["dp_below"].to(torch.float64).sum() + sigma_b * torch.randn(
                (), generator=g, dtype=torch.float64)
            below = float(count) / expected + 0.5
            new = clip * math.exp(-clip_lr * (below - quantile))
            extra = {**extra, "broadcast": {**extra["broadcast"], "dp": {"clip": new}}}
        return out, extra

    return server_fn


def _clip_rows(deltas: dict, clip: float) -> dict:
    """Each row (client) of the stacked ``deltas`` scaled to L2 norm at most ``clip``."""
    n = next(iter(deltas.values())).shape[0]
    norm = torch.cat([v.reshape(n, -1) for v in deltas.values()], 1).norm(dim=1)
    factor = torch.clamp(clip / norm.clamp(min=1e-30), max=1.0)
    return {k: v * factor.reshape(-1, *[1] * (v.dim() - 1)).to(v.dtype) for k, v in deltas.items()}


_WHOLE = 2**31 - 1  # one scale for the whole update: the separate quantizer of the seed-000 comparison


def _local(cfg, algorithm, model, data, plan):
    """Local DP: each client clips its update and adds noise before it leaves the device.
    Gaussian: ``clip_l2(C)`` then ``N(0, (z 2C)^2)``; Laplace (``privacy.mechanism``):
    ``clip_l1(C)`` then ``Laplace(b 2C)`` per coordinate (pure ``1/b``-DP per round). Any two
    inputs of a client differ by at most ``2C`` after the clip, under either relation."""
    p = cfg.privacy
    _own_parts(algorithm, "local")
    if p.sample_rate is not None or p.target_quantile is not None:
        raise _err("privacy.sample_rate / privacy.target_quantile do not apply to mode \"local\"")
    laplace = p.mechanism == "laplace"
    norm = p.norm or ("l1" if laplace else "l2")
    if norm != ("l1" if laplace else "l2"):
        raise _err(f"privacy.norm = {norm!r}: local mode clips each update in "
                   f"{'L1 (the Laplace mechanism)' if laplace else 'L2 (the Gaussian mechanism)'}")
    z, calibrated = _noise(cfg, 1.0, cfg.rounds)
    if laplace:
        codecs = [clip_l1(p.clip), laplace_noise(z, 2 * p.clip)]
    else:
        codecs = [clip_l2(p.clip), gaussian_noise(z, 2 * p.clip)]
    if p.quantize_bits is not None:
        codecs.append(stochastic_quantize(p.quantize_bits, bucket=_WHOLE))
    algorithm = dataclasses.replace(algorithm, uplink=_after(chain(*codecs), algorithm))
    details = {"noise_multiplier": z, "calibrated": calibrated, "clip": p.clip, "norm": norm,
               "mechanism": p.mechanism, "sensitivity": 2 * p.clip}
    # The noise scale is z x 2C: one record (added, removed or replaced) can move the clipped
    # update anywhere in the ball, 2C. Events count in clips (replace_one doubles them), so the
    # event's multiplier is z under add/remove and 2z under replace_one: epsilon is the same.
    zz = z if p.neighboring == "add_remove" else 2 * z
    return algorithm, plan, [(ev.laplace(zz) if laplace else ev.gaussian(zz), 1)], details


def _intrinsic(cfg, algorithm, model, data, plan):
    p = cfg.privacy
    _own_parts(algorithm, "intrinsic", uplink=True)
    missing = [k for k in ("sample_rate", "step") if getattr(p, k) is None]
    if missing:
        raise _err(f"privacy.mode = \"intrinsic\" needs privacy.{missing[0]} (sample_rate: the "
                   "Poisson rate of records; step: the quantization step Delta of FIG. 4)")
    extra = [k for k in ("noise_multiplier", "quantize_bits", "target_quantile")
             if getattr(p, k) is not None]
    if extra:
        raise _err(f"privacy.{extra[0]} does not apply to mode \"intrinsic\" (its noise is the "
                   "quantizer's: privacy.uniforms and privacy.step)")
    if cfg.client.steps not in (None, 1):
        raise _err("mode \"intrinsic\" computes one clipped gradient per round (FIG. 4); "
                   f"client.steps = {cfg.client.steps} does not apply")
    q, norm, d = p.sample_rate, p.norm or "linf", sum(v.numel() for v in model.parameters())
    uplink = dithered_quantize(p.step, p.uniforms, p.clip, norm=norm, dimension=d, sample_rate=q,
                               integers=True)
    algorithm = dataclasses.replace(
        algorithm, uplink=uplink, client_fn=_intrinsic_client(model, p.clip, q, norm),
        server_fn=intrinsic_server(p.step, cfg.client.lr), aux_spec=_INTRINSIC_AUX)
    floor = delta_floor(p.uniforms + 1, p.step, p.clip, d, q, cfg.rounds)
    if floor >= p.delta:
        raise _err(f"privacy.mode = \"intrinsic\": epsilon is infinite at privacy.delta = "
                   f"{p.delta:g}: with clip/step = {p.clip / p.step:g} and {p.uniforms + 1} "
                   f"uniforms, some of the {d} coordinates falls outside the noise's overlap with "
                   f"probability {floor:.3g} over {cfg.rounds} rounds (the delta floor). Lower "
                   "privacy.clip, raise privacy.step or privacy.uniforms, or lower sample_rate")
    work = dataclasses.replace(plan.work, steps=1, epochs=None)
    details = {"uniforms": p.uniforms, "step": p.step, "clip": p.clip, "norm": norm,
               "sample_rate": q, "dimension": d, "server_lr": cfg.client.lr}
    return algorithm, dataclasses.replace(plan, work=work), [(uplink.event, 1)], details


_INTRINSIC_AUX = lambda params: {"dither_seed": ((), torch.int64, -math.inf, math.inf),  # noqa: E731
                                 "count": ((), torch.float64, 0.0, math.inf)}


def _intrinsic_client(model, clip: float, q: float, norm: str):
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

        def draw_batches(x, y, cid, r, seed, work, params, secret=None):
            batches = poisson_batches(x, y, 1, q, rng.private_key(seed, r, cid, "client", secret))
            batches["dither_seed"] = torch.tensor(rng.key(seed, r, cid, "dither"), dtype=torch.int64)
            return batches, torch.ones(1, dtype=torch.bool), False

        update.draw_batches = draw_batches
        return update

    return client_fn


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


_MODES = {"dp_sgd": _dp_sgd, "dp_fedavg": _dp_fedavg, "local": _local, "intrinsic": _intrinsic}
