"""A validated ``Config`` turned into the objects of a run: ``build`` -> ``(algorithm, model,
data, plan)`` for ``simulate``, ``build_data`` and the ``runtime``."""
from __future__ import annotations

from atoll.config.aggregation import build_aggregator, fltrust_update, with_attack, with_secure
from atoll.config.sections import CommConfig, Config, PrivacyConfig
from atoll.errors import ConfigError


def runtime(cfg: Config):
    """The runtime named by ``runtime.name`` (``auto`` picks the vectorised one, or the loop
    runtime where ``watermark.fingerprint`` sends each client its own copy)."""
    from atoll.runtime import make_runtime

    if cfg.watermark.fingerprint:
        if cfg.runtime.name not in ("auto", "loop"):
            raise ConfigError(f"watermark.fingerprint sends each client its own copy, which "
                              f"runtime.name = {cfg.runtime.name!r} cannot carry (its clients share "
                              "one broadcast); use runtime.name = \"loop\" or \"auto\"")
        return make_runtime(cfg.runtime.model_copy(update={"name": "loop"}))
    return make_runtime(cfg.runtime)


def _with_comm(algorithm, comm: CommConfig, num_clients: int):
    """The algorithm with the ``[comm]`` section's uplink codec, server top-k and downlink."""
    import dataclasses

    from atoll import transforms
    from atoll.codecs.registry import build_codec
    from atoll.downlink import DeltaTracker, server_topk

    try:
        uplink = build_codec(comm.uplink)
    except ValueError as exc:
        raise ConfigError(f"comm.uplink: {exc}") from None
    if uplink.event is not None:
        raise ConfigError(f"comm.uplink = {uplink.name!r} adds privacy noise that nothing here "
                          "would account; use privacy.mode = \"local\" (privacy.mechanism = "
                          "\"gaussian\" or \"laplace\"), which clips, adds and accounts it; "
                          "comm.uplink may then compress after it")
    parts = {"uplink": uplink}
    if comm.server_topk is not None:
        parts["server_opt"] = transforms.chain(
            server_topk(comm.server_topk, momentum=comm.server_topk_momentum), algorithm.server_opt)
    elif comm.server_topk_momentum:
        raise ConfigError("comm.server_topk_momentum is set but comm.server_topk is not")
    if comm.downlink != "model":
        parts["tracker"] = DeltaTracker(num_clients, base=comm.downlink, anchor_every=comm.anchor_every,
                                         holds_initial=comm.clients_hold_initial)
    elif comm.anchor_every:
        raise ConfigError('comm.anchor_every needs comm.downlink = "client" or "initial"')
    return dataclasses.replace(algorithm, **parts)


def build(cfg: Config, data=None):
    """Turn a validated config into ``(algorithm, model, data, plan)`` for ``simulate``.

    ``data``: federated data to use instead of loading ``[data]``; a deployed client passes a
    stand-in with only ``n_features``, ``n_classes`` and ``clients`` (one entry per client).
    """
    import torch

    from atoll import algorithms, models, transforms
    from atoll.runtime.base import LocalWork
    from atoll.simulation import Plan

    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    fed = data if data is not None else build_data(cfg)
    kwargs = dict(cfg.model.kwargs, **({"hidden": cfg.model.hidden} if cfg.model.hidden else {}))
    try:
        model = models.build(cfg.model.name, fed.n_features, fed.n_classes, seed=cfg.seed,
                             **kwargs).to(dtype)
    except TypeError as exc:
        raise ConfigError(f"model {cfg.model.name!r} does not accept model.kwargs/model.hidden "
                          f"{kwargs}: {exc}") from None
    c, a = cfg.client, cfg.algorithm
    local = (transforms.adam(c.lr, weight_decay=c.weight_decay) if c.optimizer == "adam" else
             transforms.sgd(c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay))
    local = _transfer(cfg.model, model, local, server=data is None)
    options = {"fedavgm": {"server_momentum": a.server_momentum}, "fedprox": {"mu": a.mu},
               "fedadam": {"b1": a.b1, "b2": a.b2, "tau": a.tau, "initial_v": a.initial_v},
               "fedyogi": {"b1": a.b1, "b2": a.b2, "tau": a.tau, "initial_v": a.initial_v},
               "fedadagrad": {"tau": a.tau, "initial_v": a.initial_v}, "fednova": {"momentum": c.momentum},
               "scaffold": {"local_lr": c.lr, "num_clients": len(fed.clients)},
               "fedagrac": {"local_lr": c.lr, "lam": a.lam, "form": a.form},
               "ditto": {"lam": 0.1 if a.lam is None else a.lam}, "fedper": {"head": a.head},
               "fedrep": {"head": a.head, "head_epochs": a.head_epochs}, "lg_fedavg": {"head": a.head},
               "apfl": {"alpha": a.alpha, "alpha_step": a.alpha_step},
               "pfedme": {"lam": 15.0 if a.lam is None else a.lam, "inner_steps": a.inner_steps,
                          "inner_lr": a.inner_lr or 0.05},
               "per_fedavg": {"alpha": a.inner_lr or 0.01, "variant": a.variant, "delta": a.delta,
                              "adapt_steps": a.adapt_steps}}.get(a.name, {})
    if a.name == "pfedme" and not (0 < options["lam"] * max(options["inner_lr"], c.lr) < 2):
        raise ConfigError(f"algorithm.lam = {options['lam']}, algorithm.inner_lr = {options['inner_lr']}, "
                          f"client.lr = {c.lr}: pfedme needs lam > 0, inner_lr * lam < 2 and "
                          "client.lr * lam < 2 (else its steps toward theta and w overshoot)")
    if a.server_lr is not None:
        options["server_lr"] = a.server_lr
    if isinstance(a.weighting, list) and len(a.weighting) != len(fed.clients):
        raise ConfigError(f"algorithm.weighting lists {len(a.weighting)} weights for "
                          f"{len(fed.clients)} clients")
    trust = fltrust_update(cfg, model, local, fed) if cfg.aggregator.name == "fltrust" else None
    algorithm = algorithms.RECIPES[a.name](local, aggregator=build_aggregator(cfg, trust), **options)
    if cfg.attack.name != "none":
        algorithm, fed = with_attack(cfg, algorithm, fed)
    algorithm = _with_comm(algorithm, cfg.comm, len(fed.clients))
    if cfg.secure.method != "none":
        algorithm = with_secure(cfg, algorithm, fed)
    s = cfg.sampling
    devices, schedule, asynchronous = _heterogeneity(cfg, algorithm, model, len(fed.clients))
    work = LocalWork(batch_size=c.batch_size, epochs=None if c.steps else c.epochs, steps=c.steps,
                     stragglers=c.stragglers, drop_stragglers=c.drop_stragglers, schedule=schedule)
    plan = Plan(rounds=cfg.rounds, seed=cfg.seed, sampling=s.method,
                clients_per_round=s.clients_per_round, fraction=s.fraction, rate=s.rate,
                work=work, eval_every=cfg.eval.every, federated_eval=cfg.eval.federated,
                train_eval=cfg.eval.train_loss, personal_eval=cfg.eval.personal,
                new_clients=cfg.eval.new_clients, finetune=cfg.eval.finetune,
                checkpoint_every=cfg.checkpoint.every, devices=devices, asynchronous=asynchronous)
    if cfg.eval.new_clients >= max(len(fed.clients), 1) or (cfg.eval.personal or cfg.eval.new_clients) \
            and asynchronous is not None:
        raise ConfigError(f"eval.new_clients = {cfg.eval.new_clients} must be below the number of "
                          f"clients ({len(fed.clients)}); eval.personal and eval.new_clients need "
                          f"synchronous rounds (no [async])")
    if cfg.privacy != PrivacyConfig():  # [privacy]: private parts and the budget
        from atoll.privacy_config import configure

        algorithm, plan = configure(cfg, algorithm, model, fed, plan)
        if plan.asynchronous is not None:
            from atoll.asynchronous import check_privacy
            try:
                check_privacy(plan.privacy)
            except ValueError as exc:
                raise ConfigError(f"[async] with [privacy]: {exc}") from None
    if cfg.watermark.enabled and data is None:  # the server side only: a client never reads the key
        algorithm = _with_watermark(cfg, algorithm, model, fed)
    if cfg.watermark.fingerprint and data is None:
        algorithm = _with_fingerprints(cfg, algorithm, model, fed, plan)
    return algorithm, model, fed, plan


def _transfer(m, model, local, server: bool):
    """``[model] init / init_only / freeze``: load the pretrained entries into ``model`` (on the
    server side only: a deployed client never opens a path the server names; it receives the
    model), and chain ``frozen`` after the local optimizer so those entries are never trained."""
    import torch

    from atoll import transforms

    if m.init_only is not None and m.init is None:
        raise ConfigError("model.init_only is set but model.init (the model file) is not")
    if m.init is not None and server:
        from atoll.models.weights import load_weights

        try:
            loaded = load_weights(m.init, model, m.init_only)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.init: {exc}") from None
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in loaded:
                    p.copy_(loaded[k])
    if not m.freeze:
        return local
    names = [k for k, _ in model.named_parameters() if any(k.startswith(p) for p in m.freeze)]
    if not names:
        raise ConfigError(f"model.freeze = {m.freeze}: no parameter of the model starts with "
                          f"these (it has {', '.join(k for k, _ in model.named_parameters())})")
    return transforms.chain(local, transforms.frozen(names))


def _with_watermark(cfg: Config, algorithm, model, fed):
    """``[watermark]``: the server optimizer followed by the trigger-set embedding."""
    from atoll import watermark as W

    w = cfg.watermark
    names = [k for k, _ in model.named_parameters()]
    if w.layers and not any(k.startswith(tuple(w.layers)) for k in names):
        raise ConfigError(f"watermark.layers = {w.layers}: no parameter of the model starts with "
                          f"these (it has {', '.join(names)}); the embedding would train nothing")
    key = W.load_key(cfg.watermark_key_file, create=True)
    triggers = W.trigger_set(key, w.trigger_size, (fed.n_features,), fed.n_classes, w.scale,
                             next(model.parameters()).dtype)
    return W.with_watermark(algorithm, model, triggers, key, steps=w.steps,
                            lr=w.lr, every=w.every, batch=w.batch, preserve=w.preserve,
                            anchors=w.anchors, until=w.until, layers=tuple(w.layers))


def _with_fingerprints(cfg: Config, algorithm, model, fed, plan):
    """``[watermark] fingerprint = true``: each sampled client receives its own copy with its
    code (``Algorithm.client_copy``), in the loop runtime and in deployment."""
    import dataclasses

    from atoll import watermark as W
    from atoll.client import params_of

    if not cfg.watermark.enabled:
        raise ConfigError("watermark.fingerprint needs watermark.enabled = true (the fingerprints "
                          "are drawn from the watermark's key)")
    if algorithm.tracker is not None:
        raise ConfigError("watermark.fingerprint and comm.downlink per-client deltas both send "
                          "each client its own model; choose one")
    if plan.asynchronous is not None:
        raise ConfigError("watermark.fingerprint: per-client copies need synchronous rounds "
                          "(no [async]: its groups share one broadcast)")
    fp = W.fingerprints(W.load_key(cfg.watermark_key_file), params_of(model), len(fed.clients))
    return dataclasses.replace(algorithm, client_copy=W.FingerprintCopies(fp))


def build_data(cfg: Config):
    """The federated data described by ``[data]``."""
    import torch

    from atoll import data

    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    d = cfg.data
    ds = data.load(d.name, seed=cfg.seed, label=d.label, group_column=d.group_column,
                   synthetic_alpha=d.synthetic_alpha, synthetic_beta=d.synthetic_beta,
                   synthetic_devices=d.synthetic_devices, synthetic_iid=d.synthetic_iid)
    return data.build(ds, num_clients=d.num_clients, partition=d.partition, seed=cfg.seed,
                      test_fraction=d.test_fraction, client_test_fraction=d.client_test_fraction,
                      standardize=d.standardize, dtype=dtype, alpha=d.alpha,
                      shards_per_client=d.shards_per_client, sigma=d.sigma)


def _heterogeneity(cfg: Config, algorithm, model, num_clients: int):
    """``[devices]`` and ``[async]`` as (Devices or None, step schedule or None, AsyncPlan or None)."""
    from atoll import devices as dev
    from atoll import tree as T
    from atoll.asynchronous import AsyncPlan
    from atoll.client import params_of
    from atoll.transport import wire

    d, a = cfg.devices, cfg.asynchronous
    devices = schedule = None
    if d.profile != "none":
        devices = dev.make_devices(num_clients, cfg.seed, d.profile, d.speed, d.up, d.down, d.spread,
                                   d.slowdown, d.slow, d.csv, d.availability, d.on_s, d.off_s, d.trace)
    elif d.steps == "deadline" or d.availability != "always":
        raise ConfigError(f"devices.steps = {d.steps!r} / devices.availability = {d.availability!r} "
                          "need a device profile: set devices.profile")
    if d.steps != "work":
        message = len(wire.dumps(T.join(algorithm.broadcast(algorithm.init(params_of(model))))))
        schedule = dev.make_schedule(devices, num_clients, cfg.seed, d.steps, d.steps_mean,
                                     d.steps_std, d.deadline_s, message, d.max_steps)
    plan = None
    if a.mode != "none":
        plan = AsyncPlan(a.mode, a.concurrency, a.buffer, a.alpha, a.staleness, a.a, a.b,
                         a.max_staleness, a.weighting)
    return devices, schedule, plan
