"""The privacy modes' shared checks (``err``, ``own_parts``, ``noise_of``) and the two modes
that bring their own client and server halves: ``intrinsic`` (the DP intrinsic quantizer is the
noise) and ``distributed`` (Skellam noise under the secure sum). ``privacy_config.configure``
dispatches to them; docs/privacy.md and docs/secure-aggregation.md."""
from __future__ import annotations

import dataclasses
import math

from atoll.algorithms.dp import INTRINSIC_AUX, intrinsic_client, intrinsic_draw, intrinsic_server
from atoll.client import local_training
from atoll.codecs import dithered_quantize
from atoll.errors import ConfigError
from atoll.privacy import events as ev
from atoll.privacy.accountant import Accountant
from atoll.privacy.calibrate import noise_for_epsilon
from atoll.privacy.irwin_hall import delta_floor
from atoll.secure.distributed import plan as skellam_plan
from atoll.secure.stage import SecureSum


def err(msg: str):
    return ConfigError(msg)


def own_parts(algorithm, mode: str, uplink: bool = False) -> None:
    """Refuse, with the reason, an algorithm this privacy mode cannot protect or account.

    Every mode but ``intrinsic`` composes with a compressed uplink (compression after the
    noise is post-processing; ``dp_fedavg``'s server re-clips what it decodes). ``dp_sgd``
    composes with every client half (it is the gradient estimator they all step on, so what
    they send, ``aux`` included, is post-processing of DP-SGD's releases). ``dp_fedavg`` and
    ``local`` clip and noise the ``aux`` of an algorithm whose server reads only its mean
    (``server_aux``: SCAFFOLD, FedaGrac's seed form) with the delta; they refuse a server step
    that reads each client's update or aux on its own (``server_fn``: FedNova's step counts,
    FedaGrac's published rule), which no noisy sum gives. ``intrinsic`` brings its own client
    and server halves and sends no aux."""
    if algorithm.estimator is not None or algorithm.draw is not None:
        raise err(f"privacy.mode = {mode!r}: algorithm {algorithm.name!r} already has its own "
                   "gradient estimator or batch draw")
    if mode == "dp_sgd":
        return
    aux = algorithm.aux_names()
    if algorithm.server_fn is not None or (aux and algorithm.server_aux is None):
        raise err(f"privacy.mode = {mode!r} cannot protect algorithm {algorithm.name!r}: its "
                   f"server step reads each client's update or aux {aux} on its own, which no "
                   "noisy sum gives, so no epsilon would cover it; use fedavg, fedprox, "
                   "fedadam/fedyogi, scaffold or fedagrac (form seed), or privacy.mode = dp_sgd")
    if mode != "intrinsic":
        return
    if aux or algorithm.client_fn is not local_training:
        raise err(f"privacy.mode = \"intrinsic\" replaces the client's half (one clipped gradient "
                   f"per round), so it cannot run algorithm {algorithm.name!r}'s own")
    if uplink and algorithm.uplink.name != "identity":
        raise err(f"privacy.mode = {mode!r} is itself the uplink codec (its quantizer is the "
                   f"noise), so it cannot run with comm.uplink = {algorithm.uplink.name!r}")


def noise_of(cfg, q: float, steps: int) -> tuple[float, bool]:
    """``(noise multiplier, calibrated?)``: the configured one, or the smallest that keeps the
    whole run (``rounds`` x ``steps`` Poisson-Gaussian steps) within ``target_epsilon``."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier, False
    if p.target_epsilon is None:
        raise err(f"privacy.mode = {p.mode!r} needs privacy.noise_multiplier, or "
                   "privacy.target_epsilon to calibrate it for the whole run")
    if p.accountant == "rdp_classic":
        raise err("privacy.noise_multiplier cannot be calibrated with accountant rdp_classic; "
                   "give it, or use accountant pld or rdp")
    return noise_for_epsilon(p.target_epsilon, q, steps, p.delta, p.accountant,
                             neighboring=p.neighboring, mechanism=p.mechanism), True


def intrinsic(cfg, algorithm, model, data, plan):
    p = cfg.privacy
    own_parts(algorithm, "intrinsic", uplink=True)
    missing = [k for k in ("sample_rate", "step") if getattr(p, k) is None]
    if missing:
        raise err(f"privacy.mode = \"intrinsic\" needs privacy.{missing[0]} (sample_rate: the "
                   "Poisson rate of records; step: the quantization step Delta of FIG. 4)")
    extra = [k for k in ("noise_multiplier", "quantize_bits", "target_quantile")
             if getattr(p, k) is not None]
    if extra:
        raise err(f"privacy.{extra[0]} does not apply to mode \"intrinsic\" (its noise is the "
                   "quantizer's: privacy.uniforms and privacy.step)")
    if cfg.client.steps not in (None, 1):
        raise err("mode \"intrinsic\" computes one clipped gradient per round (FIG. 4); "
                   f"client.steps = {cfg.client.steps} does not apply")
    q, norm, d = p.sample_rate, p.norm or "linf", sum(v.numel() for v in model.parameters())
    uplink = dithered_quantize(p.step, p.uniforms, p.clip, norm=norm, dimension=d, sample_rate=q,
                               integers=True)
    algorithm = dataclasses.replace(
        algorithm, uplink=uplink, client_fn=intrinsic_client(model, p.clip, q, norm), draw=intrinsic_draw(q),
        server_fn=intrinsic_server(p.step, cfg.client.lr), aux_spec=INTRINSIC_AUX)
    floor = delta_floor(p.uniforms + 1, p.step, p.clip, d, q, cfg.rounds)
    if floor >= p.delta:
        raise err(f"privacy.mode = \"intrinsic\": epsilon is infinite at privacy.delta = "
                   f"{p.delta:g}: with clip/step = {p.clip / p.step:g} and {p.uniforms + 1} "
                   f"uniforms, some of the {d} coordinates falls outside the noise's overlap with "
                   f"probability {floor:.3g} over {cfg.rounds} rounds (the delta floor). Lower "
                   "privacy.clip, raise privacy.step or privacy.uniforms, or lower sample_rate")
    work = dataclasses.replace(plan.work, steps=1, epochs=None)
    details = {"uniforms": p.uniforms, "step": p.step, "clip": p.clip, "norm": norm,
               "sample_rate": q, "dimension": d, "server_lr": cfg.client.lr}
    return algorithm, dataclasses.replace(plan, work=work), details


def distributed(cfg, algorithm, model, data, plan):
    """Distributed DP: each client adds Skellam noise to its clipped, rounded update under the
    secure sum (``secure.distributed``), so the server sees only the noisy sum; accounted as
    zCDP by an RDP accountant, without amplification by sampling."""
    p, sec = cfg.privacy, algorithm.secure
    if not isinstance(sec, SecureSum):
        raise err('privacy.mode = "distributed" adds each client\'s noise under the secure sum: '
                   'it needs [secure] method = "secagg" or "secagg+"')
    if p.accountant == "pld":
        raise err('privacy.mode = "distributed": the Skellam mechanism is accounted in RDP; set '
                   'privacy.accountant = "rdp"')
    extra = [k for k in ("sample_rate", "target_quantile", "quantize_bits", "step", "aux_clip")
             if getattr(p, k) is not None]
    if extra or (p.norm or "l2") != "l2":
        raise err(f"privacy.{extra[0] if extra else 'norm'} does not apply to mode "
                   "\"distributed\" (an L2 clip, integer rounding and Skellam noise per client)")
    cohort = cfg.sampling.clients_per_round or len(data.clients)
    k = max(1, math.floor(cohort * (1 - sec.dropout)))  # the survivors the noise counts on
    d = sum(v.numel() for v in model.parameters())
    bits = sec.input_bits + math.ceil(math.log2(max(cohort, 2)))
    z, calibrated = noise_of(cfg, 1.0, cfg.rounds)
    for _ in range(200):  # the Skellam bound sits a little above the Gaussian's: raise z to fit
        noise = skellam_plan(p.clip, z, d, k, cohort, bits)
        if not calibrated or _run_epsilon(cfg, secure_event(noise, p.neighboring)) <= p.target_epsilon:
            break
        z *= 1.01
    algorithm = dataclasses.replace(algorithm, secure=dataclasses.replace(sec, noise=noise))
    details = {"noise_multiplier": z, "calibrated": calibrated, "clip": p.clip,
               "scale": noise.scale, "skellam_mu": noise.mu, "clients": k, "ring_bits": bits,
               "sensitivity_l2": noise.delta2 * (2 if p.neighboring == "replace_one" else 1)}
    return algorithm, plan, details


def secure_event(noise, neighboring: str):
    """The Skellam noise's event (zCDP) at the relation's sensitivity: one client's clipped
    update moves the sum by one clip, replacing it by two."""
    return ev.zcdp(*noise.zcdp(2.0 if neighboring == "replace_one" else 1.0))


def _run_epsilon(cfg, event) -> float:
    acc = Accountant(cfg.privacy.accountant, cfg.privacy.neighboring)
    acc.step(event, cfg.rounds)
    return acc.epsilon(cfg.privacy.delta)
