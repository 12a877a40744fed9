"""The ``[privacy]`` section wired into a run: each mode's parts, events and checks.

``configure(cfg, algorithm, model, data, plan)`` (called by ``config.build``) checks the
``[privacy]`` section against the rest of the config and returns the algorithm with its private
parts (``atoll.algorithms.dp``) and the plan with a ``privacy.run.PrivacySpec`` (the run's
events per round and its budget). The events are read from the assembled stages
(``stage_events``): each mode builds stages that declare what they release, never a list beside
them. It sits at the edge beside the ``atoll.config`` package: it reads a config
and assembles algorithms, so no stage imports it.

Modes (``privacy.mode``) and the events their stages declare per round:

* ``dp_sgd``: record-level DP-SGD inside each client (``privacy.dpsgd``): ``S`` steps of
  ``poisson_gaussian(sample_rate, z)``. Poisson batches and noise are drawn outside the pure
  update (``Algorithm.draw``), so the vectorised runtime runs it under ``vmap``.
* ``dp_fedavg``: client-level DP-FedAvg (McMahan et al. 2018): each client clips its update to
  L2 ``clip``; Poisson client sampling at ``sampling.rate``; the server adds
  ``N(0, (z_update * clip)^2)`` to the *sum* and divides by the expected cohort ``rate * K``;
  optional adaptive clipping to ``target_quantile`` (Andrew et al. 2021, geometric update, noisy
  count with std ``clip_count_stddev``; ``z`` is then the effective multiplier of both).
  Event: ``poisson_gaussian(rate, z)``.
* ``local``: local DP on the uplink: ``clip_l2(clip)`` then Gaussian noise of std
  ``z * 2 * clip`` (any two inputs of a client differ by at most ``2 * clip``). Event:
  ``gaussian(z)`` of the noise codec (with an ``aux``: one event per noised part).
* ``intrinsic``: DP intrinsic quantization (US 11,017,322 B1, FIG. 4): one clipped-gradient mean
  per round over a Poisson sample of records, quantized by ``dithered_quantize``; the server sums
  the *integers* (what secure aggregation would reveal), removes the dithers from their seeds and
  steps ``w -= lr * g``. Event: ``intrinsic_quantization(Z + 1, step, clip, d, sample_rate)``.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from atoll.algorithms.dp import clipping_client, dp_fedavg_server, dp_sgd_draw
from atoll.client import buffer_names
from atoll.codecs import chain, clip_l1, clip_l2, gaussian_noise, laplace_noise
from atoll.codecs.quantize import stochastic_quantize
from atoll.errors import ConfigError
from atoll.privacy import events as ev
from atoll.privacy.accountant import Accountant
from atoll.privacy.dpsgd import DpEstimator, dp_gradients
from atoll.privacy.calibrate import step_event, steps_for_epochs
from atoll.privacy.run import PrivacySpec
from atoll.privacy_modes import distributed, err, intrinsic, noise_of, own_parts, secure_event


def configure(cfg, algorithm, model, data, plan):
    """``(algorithm, plan)`` with the privacy mode of ``cfg.privacy`` wired in (or unchanged
    for ``mode = "none"``); a ``ConfigError`` naming the keys for inconsistent settings."""
    p = cfg.privacy
    if p.mode == "none":
        loose = [part for part, _, _ in _declared(algorithm, plan.work.steps or 1, p.neighboring)]
        if loose:
            raise ConfigError(f"algorithm {algorithm.name!r}: its {loose[0]} adds privacy noise "
                              "but privacy.mode is \"none\", so no accountant would charge it; "
                              "choose a privacy mode")
        given = [k for k in ("target_epsilon", "noise_multiplier", "sample_rate", "step",
                             "target_quantile", "quantize_bits") if getattr(p, k) is not None]
        if p.mechanism != "gaussian":
            given.append("mechanism")
        if given:
            raise ConfigError(f"privacy.{given[0]} is set but privacy.mode is \"none\"; choose a "
                              "mode: dp_sgd, dp_fedavg, local, intrinsic or distributed")
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
        algorithm, plan, details = _MODES[p.mode](cfg, algorithm, model, data, plan)
        events = stage_events(algorithm, plan.work.steps, p.neighboring)
        spec = PrivacySpec(p.mode, events, p.accountant, p.neighboring, p.delta,
                           p.target_epsilon, details,
                           stage_events(algorithm, plan.work.steps, p.neighboring, client_only=True))
        probe = Accountant(p.accountant, p.neighboring)
        for event, count in events:
            probe.step(event, count)  # refuses events this accountant cannot compose
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"[privacy] mode {p.mode!r}: {exc}") from None
    return algorithm, dataclasses.replace(plan, privacy=spec)


def stage_events(algorithm, steps: int | None, neighboring: str,
                 client_only: bool = False) -> tuple:
    """One round's privacy events ``((event, count), ...)``, read from the assembled stages.

    * the gradient estimator's (DP-SGD): one event per local step, ``steps`` of them;
    * each noise codec on a client's way out (``uplink``, ``aux_codec``). A codec states its
      noise at its own sensitivity: the most its input moves between *any* two inputs of the
      client, which the clip before it bounds under either relation. The accountant's Gaussian
      and Laplace events count in clips of the relation, two under ``replace_one`` (it halves
      their multipliers there), so under ``replace_one`` a codec's event enters at twice its
      multiplier and is accounted at the noise it really has;
    * the secure sum's noise (distributed DP's Skellam: zCDP at the relation's sensitivity);
    * the server's (``server_event``: DP-FedAvg's noise on the sum), unless ``client_only``: what
      protects a client *from the server* is the noise of its own stages only."""
    return tuple((event, count) for part, event, count in _declared(algorithm, steps, neighboring)
                 if not (client_only and part == "server_event"))


def _declared(algorithm, steps, neighboring):
    """``(part, event, count)`` for every stage of ``algorithm`` that adds privacy noise."""
    event = getattr(algorithm.estimator, "event", None)
    if event is not None:
        yield "estimator", event, steps
    for part in ("uplink", "aux_codec"):
        event = getattr(algorithm, part).event
        for e in event if isinstance(event, tuple) else (() if event is None else (event,)):
            yield part, _relation_free(e, neighboring), 1
    if algorithm.secure is not None and algorithm.secure.noise is not None:
        yield "secure", secure_event(algorithm.secure.noise, neighboring), 1
    if algorithm.server_event is not None:
        yield "server_event", algorithm.server_event, 1


def _relation_free(event, neighboring: str):
    """A codec's event in the accountant's units: its multiplier doubled under replace_one."""
    if neighboring != "replace_one":
        return event
    if isinstance(event, ev.dp_event.GaussianDpEvent):
        return ev.gaussian(2 * event.noise_multiplier)
    if isinstance(event, ev.dp_event.LaplaceDpEvent):
        return ev.laplace(2 * event.noise_multiplier)
    return event


def _aux_ratio(p, algorithm) -> float | None:
    """``aux_clip / clip`` for an algorithm that sends aux (``None``: it sends none)."""
    if not algorithm.aux_names():
        if p.aux_clip is not None:
            raise err(f"privacy.aux_clip applies to algorithms that send aux (scaffold, "
                       f"fedagrac); {algorithm.name!r} sends none")
        return None
    return (p.aux_clip if p.aux_clip is not None else p.clip) / p.clip


def _after(codec, algorithm):
    """``codec`` followed by the algorithm's own uplink (compression after the noise)."""
    return codec if algorithm.uplink.name == "identity" else chain(codec, algorithm.uplink)


def _dp_sgd(cfg, algorithm, model, data, plan):
    p = cfg.privacy
    own_parts(algorithm, "dp_sgd")
    if p.sample_rate is None:
        raise err("privacy.mode = \"dp_sgd\" needs privacy.sample_rate: the Poisson rate at "
                   "which each local step samples the client's records")
    if p.target_quantile is not None:
        raise err("privacy.target_quantile (adaptive clipping) belongs to mode \"dp_fedavg\"")
    q, norm = p.sample_rate, p.norm or "l2"
    steps = cfg.client.steps or steps_for_epochs(cfg.client.epochs, q)  # epochs in expectation
    z, calibrated = noise_of(cfg, q, cfg.rounds * steps)
    estimator = dp_gradients(model, p.clip, z, q, norm=norm)
    parts = {"estimator": DpEstimator(estimator, step_event(q, z)), "draw": dp_sgd_draw(q, steps)}
    if p.quantize_bits is not None:
        parts["uplink"] = _after(stochastic_quantize(p.quantize_bits, bucket=_WHOLE), algorithm)
    algorithm = dataclasses.replace(algorithm, **parts)
    work = dataclasses.replace(plan.work, steps=steps, epochs=None)
    details = {"noise_multiplier": z, "calibrated": calibrated, "clip": p.clip, "norm": norm,
               "sample_rate": q, "local_steps": steps}
    return algorithm, dataclasses.replace(plan, work=work), details


def _dp_fedavg(cfg, algorithm, model, data, plan):
    p, s = cfg.privacy, cfg.sampling
    own_parts(algorithm, "dp_fedavg")
    if s.method != "poisson" or s.rate is None:
        raise err("privacy.mode = \"dp_fedavg\" needs sampling.method = \"poisson\" and "
                   "sampling.rate: its accounting (Poisson-subsampled Gaussian) assumes every "
                   "client joins each round independently with probability sampling.rate; "
                   f"got sampling.method = {s.method!r}, rate = {s.rate}")
    if p.sample_rate is not None or p.quantize_bits is not None:
        raise err("privacy.sample_rate / privacy.quantize_bits do not apply to mode "
                   "\"dp_fedavg\" (clients are sampled with sampling.rate; the server needs the "
                   "clipped updates exactly)")
    if (p.norm or "l2") != "l2":
        raise err("privacy.norm: dp_fedavg clips client updates in L2")
    z, calibrated = noise_of(cfg, s.rate, cfg.rounds)
    m = s.rate * len(data.clients)  # expected cohort: the fixed denominator
    adaptive = p.target_quantile is not None
    z_update, sigma_b = z, None
    if adaptive:
        sigma_b = p.clip_count_stddev if p.clip_count_stddev is not None else m / 20
        if not 2 * sigma_b > z:
            raise err(f"privacy.clip_count_stddev = {sigma_b:g} is too small for "
                       f"noise_multiplier {z:g}: adaptive clipping needs 2 * stddev > "
                       "noise_multiplier (Andrew et al. 2021, Thm 1)")
        z_update = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5 if z > 0 else 0.0
    ratio, inner_spec, inner_init = _aux_ratio(p, algorithm), algorithm.aux_spec, algorithm.server_init

    def server_init(params):
        dtype = next(iter(params.values())).dtype
        own = inner_init(params) if inner_init is not None else {}
        return {**own, "broadcast": {**own.get("broadcast", {}),
                                     "dp": {"clip": torch.tensor([p.clip], dtype=dtype)}}}

    algorithm = dataclasses.replace(
        algorithm, client_fn=clipping_client(adaptive, ratio, algorithm.client_fn),
        aux_spec=lambda params: {**inner_spec(params),
                                 **({"dp_below": ((), None, -0.5, 0.5)} if adaptive else {})},
        server_init=server_init, server_aux=None, server_event=step_event(s.rate, z),
        server_fn=dp_fedavg_server(m, z_update, sigma_b, p.target_quantile, p.clip_lr,
                                   reclip=algorithm.uplink.name != "identity", aux_ratio=ratio,
                                   server_aux=algorithm.server_aux))
    details = {"noise_multiplier": z, "calibrated": calibrated, "update_noise_multiplier": z_update,
               "clip": p.clip, "adaptive": adaptive, "target_quantile": p.target_quantile,
               "clip_count_stddev": sigma_b, "expected_clients": m}
    if ratio is not None:
        details["aux_clip"] = ratio * p.clip
    return algorithm, plan, details


_WHOLE = 2**31 - 1  # one scale for the whole update: the separate quantizer of the seed-000 comparison


def _local(cfg, algorithm, model, data, plan):
    """Local DP: each client clips its update and adds noise before it leaves the device.
    Gaussian: ``clip_l2(C)`` then ``N(0, (z 2C)^2)``; Laplace (``privacy.mechanism``):
    ``clip_l1(C)`` then ``Laplace(b 2C)`` per coordinate (pure ``1/b``-DP per round). Any two
    inputs of a client differ by at most ``2C`` after the clip, under either relation."""
    p = cfg.privacy
    own_parts(algorithm, "local")
    if p.sample_rate is not None or p.target_quantile is not None:
        raise err("privacy.sample_rate / privacy.target_quantile do not apply to mode \"local\"")
    laplace = p.mechanism == "laplace"
    norm = p.norm or ("l1" if laplace else "l2")
    if norm != ("l1" if laplace else "l2"):
        raise err(f"privacy.norm = {norm!r}: local mode clips each update in "
                   f"{'L1 (the Laplace mechanism)' if laplace else 'L2 (the Gaussian mechanism)'}")
    ratio = _aux_ratio(p, algorithm)
    clip, noise = (clip_l1, laplace_noise) if laplace else (clip_l2, gaussian_noise)
    # With an aux, the delta and the aux * C / C_aux each move by at most 2C and each get their
    # own noise and event. Two Gaussian events of multiplier z sqrt(2) compose to one of z (two
    # Laplace of 2b to pure 1/b per round), so a given noise_multiplier keeps its meaning, the
    # round's; a calibrated one is found for the parts' events directly.
    joint = 1.0 if ratio is None else (2.0 if laplace else math.sqrt(2))
    z, calibrated = noise_of(cfg, 1.0, cfg.rounds * (1 if ratio is None else 2))
    part, z = (z, z / joint) if calibrated else (z * joint, z)
    sensitivity = 2 * p.clip
    codecs = [clip(p.clip), noise(part, sensitivity)]
    if p.quantize_bits is not None:
        codecs.append(stochastic_quantize(p.quantize_bits, bucket=_WHOLE))
    parts = {"uplink": _after(chain(*codecs), algorithm)}
    if ratio is not None:
        parts["aux_codec"] = chain(clip(ratio * p.clip), noise(part, sensitivity * ratio))
    algorithm = dataclasses.replace(algorithm, **parts)
    details = {"noise_multiplier": z, "calibrated": calibrated, "clip": p.clip, "norm": norm,
               "mechanism": p.mechanism, "sensitivity": sensitivity}
    if ratio is not None:
        details["aux_clip"] = ratio * p.clip
    return algorithm, plan, details


_MODES = {"dp_sgd": _dp_sgd, "dp_fedavg": _dp_fedavg, "local": _local, "intrinsic": intrinsic,
          "distributed": distributed}
