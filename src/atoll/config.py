"""TOML experiment files, validated by pydantic, turned into objects.

Every section forbids unknown keys: a misspelt key is an error naming it and suggesting the
closest valid key; a bad value names the field and the accepted range.
"""
from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atoll.errors import ConfigError  # noqa: F401 (re-exported: atoll.config.ConfigError)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    name: str = "digits"
    num_clients: int = Field(10, ge=0)
    partition: Literal["iid", "dirichlet", "shards", "quantity", "column"] = "iid"
    alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, ge=1)
    sigma: float = Field(1.0, gt=0)
    label: str = "label"
    group_column: str | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1)
    client_test_fraction: float = Field(0.2, ge=0, lt=1)
    standardize: bool = True
    synthetic_alpha: float = Field(1.0, ge=0)
    synthetic_beta: float = Field(1.0, ge=0)
    synthetic_devices: int = Field(30, ge=1)
    synthetic_iid: bool = False


class ModelConfig(_Section):
    name: str = "mlp"
    hidden: list[int] | None = None
    kwargs: dict[str, Any] = {}


class ClientConfig(_Section):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(10, ge=1)
    epochs: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1)
    stragglers: float = Field(0.0, ge=0, le=1)
    drop_stragglers: bool = False


class AlgorithmConfig(_Section):
    name: Literal["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                  "fednova", "scaffold", "fedagrac"] = "fedavg"
    server_lr: float | None = Field(None, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)
    mu: float = Field(0.01, ge=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    initial_v: float | None = Field(None, ge=0)  # fedadam/fedyogi/fedadagrad: v_-1; None = tau^2 (Reddi et al.)
    weighting: Literal["samples", "uniform"] | list[float] = "samples"  # or one weight per client
    lam: float | None = Field(None, ge=0)  # fedagrac: lambda (default 0.1 seed form, 0.03 published)
    form: Literal["seed", "published"] = "seed"  # fedagrac: the patent's calibration (CN 112990488 B) or the paper code's


class AggregatorConfig(_Section):
    """How the server combines the cohort's updates (``atoll.aggregators``; docs/robustness.md)."""

    name: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
                  "geometric_median", "centered_clipping", "norm_bound", "fltrust", "flame"] = "mean"
    f: int = Field(0, ge=0)                     # attackers the rule tolerates per cohort
    m: int | None = Field(None, ge=1)           # multi_krum: how many updates to average
    tau: float = Field(10.0, gt=0)              # centered_clipping radius
    iters: int = Field(1, ge=1)                 # centered_clipping / geometric_median iterations
    c: float | None = Field(None, gt=0)         # norm_bound: L2 bound
    inner: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median"] = "mean"
    nnm: bool = False                           # nearest-neighbour mixing before the rule
    bucket: int = Field(0, ge=0)                # bucketing: bucket size s (0 = off)
    root: int = Field(0, ge=0)                  # fltrust: root samples the server trains on
    lam: float = Field(0.001, ge=0)             # flame: noise std = lam * median update norm


class AttackConfig(_Section):
    """Simulated Byzantine clients (``atoll.attacks``; simulation only, docs/robustness.md)."""

    name: Literal["none", "sign_flip", "gaussian", "scaled", "alie", "ipm", "min_max", "min_sum",
                  "label_flip", "backdoor"] = "none"
    clients: list[int] | None = None     # the attackers' ids (default: the first `count` ids)
    count: int = Field(0, ge=0)
    start_round: int = Field(1, ge=1)
    scale: float = 10.0                  # scaled: factor; backdoor: model-replacement boost
    sigma: float = Field(200.0, gt=0)    # gaussian
    eps: float = Field(0.1, gt=0)        # ipm
    target: int = Field(0, ge=0)         # backdoor: the label the trigger should produce
    fraction: float = Field(0.5, gt=0, le=1)  # backdoor: share of an attacker's samples poisoned


class CommConfig(_Section):
    """Communication: the uplink codec, server top-k and per-client downlink deltas (US 2025/0265475 A1)."""

    uplink: str | list | dict = "identity"  # a codec spec, see atoll.codecs.registry
    server_topk: float | None = Field(None, gt=0, le=1)  # fraction of coordinates applied per round
    server_topk_momentum: float = Field(0.0, ge=0, lt=1)
    downlink: Literal["model", "client", "initial"] = "model"
    anchor_every: int = Field(0, ge=0)
    clients_hold_initial: bool = True  # clients build w_0 from the config and seed themselves


class SamplingConfig(_Section):
    method: Literal["fixed", "poisson"] = "fixed"
    clients_per_round: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)
    rate: float | None = Field(None, gt=0, le=1)


class EvalConfig(_Section):
    every: int = Field(1, ge=1)
    federated: bool = True
    train_loss: bool = False


class CheckpointConfig(_Section):
    every: int = Field(10, ge=1)


class RuntimeConfig(_Section):
    """Who runs the clients: ``auto`` (= ``vmap``), ``loop`` (reference), ``vmap``, ``ray``."""

    name: Literal["auto", "loop", "vmap", "ray"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    memory_budget_mb: float = Field(1024, gt=0)
    threads: int | None = Field(None, ge=1)
    ray_address: str | None = None
    ray_workers: int | None = Field(None, ge=1)


class DeployConfig(_Section):
    """``atoll server``: where to listen, who may join, when a round closes (docs/deployment.md)."""

    host: str = "[::]"
    port: int = Field(7070, ge=0, le=65535)
    certs: str = "certs"
    auth: Literal["mtls", "token"] = "mtls"
    round_timeout: float = Field(60.0, gt=0)
    min_clients: int = Field(1, ge=1)
    min_fraction: float = Field(1.0, gt=0, le=1)
    chunk_kb: int = Field(1024, ge=1, le=3072)
    poll_s: float = Field(10.0, gt=0)
    max_num_examples: int = Field(10_000_000, ge=1)  # an update's num_examples must be <= this
    max_update_norm: float | None = Field(None, gt=0)  # reject updates of larger L2 norm
    max_norm_ratio: float | None = Field(10.0, gt=1)  # reject norms > this x the round's median
    # denial of service (docs/deployment.md): see atoll.transport.grpc.limits.Limits
    handshake_timeout: float = Field(5.0, gt=0)
    rpc_timeout: float = Field(300.0, gt=0)
    max_rpcs: int | None = Field(None, ge=4)   # None: 2 per client + 16
    max_connections: int | None = Field(None, ge=1)
    keepalive: float = Field(60.0, gt=0)
    idle_timeout: float = Field(300.0, gt=0)
    auth_log_per_min: int = Field(10, ge=0)


class PrivacyConfig(_Section):
    """Differential privacy of a run (``atoll.privacy_config``; docs/privacy.md)."""

    mode: Literal["none", "dp_sgd", "dp_fedavg", "local", "intrinsic"] = "none"
    accountant: Literal["pld", "rdp", "rdp_classic"] = "pld"
    neighboring: Literal["add_remove", "replace_one"] = "add_remove"
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    clip: float = Field(1.0, gt=0)
    norm: Literal["l1", "l2", "linf"] | None = None  # clipping; default l2 (intrinsic: linf, laplace: l1)
    noise_multiplier: float | None = Field(None, ge=0)  # omitted: calibrated to target_epsilon
    sample_rate: float | None = Field(None, gt=0, le=1)  # Poisson rate of records (dp_sgd, intrinsic)
    target_quantile: float | None = Field(None, gt=0, lt=1)  # dp_fedavg adaptive clipping
    clip_lr: float = Field(0.2, gt=0)
    clip_count_stddev: float | None = Field(None, gt=0)  # default: expected clients / 20
    step: float | None = Field(None, gt=0)  # intrinsic: quantization step Delta
    uniforms: int = Field(3, ge=0, le=11)  # intrinsic: Z added uniforms
    quantize_bits: int | None = Field(None, ge=1, le=16)  # stochastic quantizer after the noise
    mechanism: Literal["gaussian", "laplace"] = "gaussian"  # local: Laplace clips in L1


class DevicesConfig(_Section):
    """Heterogeneous devices and the simulated clock (``atoll.devices``); off while profile = "none"."""

    profile: Literal["none", "uniform", "lognormal", "extreme", "csv"] = "none"
    speed: float = Field(10.0, gt=0)        # local steps per second (median)
    up: float = Field(1e6, gt=0)            # bytes per second
    down: float = Field(1e7, gt=0)
    spread: float = Field(0.5, ge=0)
    slowdown: float = Field(100.0, gt=0)    # extreme: the slow devices' factor
    slow: int = Field(1, ge=0)              # extreme: how many slow devices
    csv: str | None = None                  # profile = "csv": client,speed,up,down[,steps]
    availability: Literal["always", "random", "trace"] = "always"
    on_s: float = Field(60.0, gt=0)
    off_s: float = Field(60.0, gt=0)
    trace: str | None = None                # availability = "trace": client,start,end
    steps: Literal["work", "fixed", "normal", "deadline"] = "work"  # K_i; work = client.epochs/steps
    steps_mean: float = Field(50.0, gt=0)
    steps_std: float = Field(30.0, ge=0)
    deadline_s: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)


class AsyncConfig(_Section):
    """Asynchronous training (``atoll.asynchronous``); off while mode = "none"."""

    mode: Literal["none", "fedasync", "fedbuff"] = "none"
    concurrency: int = Field(10, ge=1)
    buffer: int = Field(10, ge=1)
    alpha: float = Field(0.6, gt=0, le=1)
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = Field(0.5, ge=0)
    b: float = Field(4.0, ge=0)
    max_staleness: int | None = Field(None, ge=0)
    weighting: Literal["uniform", "aggregator"] = "uniform"  # fedbuff: 1/K (Nguyen et al.) or the aggregator's


class SecureConfig(_Section):
    """Secure aggregation (``atoll.secure``; docs/secure-aggregation.md); off while method = "none"."""

    method: Literal["none", "secagg", "secagg+"] = "none"  # secagg: complete graph
    clip: float = Field(0.1, gt=0)          # per-coordinate range of an update: [-clip, clip]
    bits: int = Field(16, ge=2, le=24)      # bits per coordinate of a client's input
    neighbours: int | None = Field(None, ge=2)  # secagg+: default 20 (or everyone, if fewer)
    threshold: int | None = Field(None, ge=1)   # default neighbours // 2 + 1
    max_weight: float | None = Field(None, gt=0)  # public bound on a client's record count
    dropout: float = Field(0.0, ge=0, lt=1)  # simulation: this fraction vanishes mid-protocol
    dropout_stage: int = Field(3, ge=1, le=4)  # ... before stage 1 keys, 2 shares, 3 input, 4 unmask
    stage_timeout: float = Field(30.0, gt=0)  # deployment: seconds to wait for one stage's answers


class WatermarkConfig(_Section):
    """Server-side trigger-set watermark (``atoll.watermark``; docs/watermark.md); off while
    enabled = false. The key file is the server's secret: created if missing, never sent."""

    enabled: bool = False
    key_file: str = "watermark.key"
    trigger_size: int = Field(50, ge=1)
    scale: float = Field(6.0, gt=0)  # triggers are uniform on [-scale, scale]
    steps: int = Field(5, ge=1)      # SGD steps on the trigger set after a server step
    lr: float = Field(0.05, gt=0)
    batch: int = Field(50, ge=1)
    every: int = Field(1, ge=1)      # embed after every k-th server step


class Config(_Section):
    name: str = "run"
    seed: int = 0
    rounds: int = Field(50, ge=1)
    dtype: Literal["float32", "float64"] = "float32"
    out_dir: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    client: ClientConfig = ClientConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    sampling: SamplingConfig = SamplingConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    attack: AttackConfig = AttackConfig()
    comm: CommConfig = CommConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    deploy: DeployConfig = DeployConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure: SecureConfig = SecureConfig()
    devices: DevicesConfig = DevicesConfig()
    asynchronous: AsyncConfig = Field(AsyncConfig(), alias="async")
    watermark: WatermarkConfig = WatermarkConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def load(path: str | Path | None = None, overrides: list[str] = (), text: str | None = None) -> Config:
    """Read a TOML file (or ``text``), apply ``key=value`` overrides, validate."""
    source = str(path) if path is not None else "<config>"
    if text is None:
        if path is None:
            text = ""
        elif not Path(path).exists():
            raise ConfigError(f"config file {path} does not exist")
        else:
            text = Path(path).read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for item in overrides:
        _override(raw, item)
    return validate(raw, source)


def validate(raw: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_explain(e) for e in exc.errors())) from None


def _override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word is a string
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
    node[leaf] = parsed


def _explain(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        *parent, leaf = [str(p) for p in err["loc"]]
        valid = _fields_at(parent)
        near = difflib.get_close_matches(leaf, valid, n=1)
        hint = f"; did you mean '{'.'.join(parent + [near[0]])}'?" if near else ""
        return f"unknown key '{loc}'{hint} (valid keys here: {', '.join(valid)})"
    got = json.dumps(err.get("input"), default=str)
    return f"{loc}: {err['msg']} (got {got})"


def _fields_at(path: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for p in path:
        model = model.model_fields["asynchronous" if p == "async" else p].annotation
    return list(model.model_fields)


def dumps(cfg: Config) -> str:
    """The resolved config as TOML (scalars first, then one table per section)."""
    data = cfg.model_dump(exclude_none=True, by_alias=True)
    top = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = top + [""]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
            lines.append("")
    return "\n".join(lines)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} to TOML")


def runtime(cfg: Config):
    """The runtime named by ``runtime.name`` (``auto`` picks the vectorised one)."""
    from atoll.runtime import make_runtime

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


def _with_secure(cfg: Config, algorithm, fed):
    """``[secure]``: the algorithm with a ``SecureSum``; refuses the parts that need what a
    secure sum hides (each client's row, its aux) or that would change the sum's meaning."""
    import dataclasses

    from atoll.secure.stage import SecureSum

    s, m = cfg.secure, cfg.secure.method
    why = []
    g = cfg.aggregator
    if g.name != "mean" or g.nnm or g.bucket:
        why.append(f"aggregator.name = {g.name!r} needs each client's update, which a secure sum hides")
    if algorithm.aux_names() or algorithm.server_fn is not None:
        why.append(f"algorithm {algorithm.name!r} reads each client's aux in its server step")
    if not algorithm.uplink.plain:
        why.append(f"comm.uplink = {algorithm.uplink.name!r}: only the plain uplink is summed securely so far")
    if cfg.privacy.mode != "none":
        why.append(f"privacy.mode = {cfg.privacy.mode!r}: distributed DP under a secure sum is not built yet")
    if cfg.attack.name != "none":
        why.append("[attack]: robust aggregation under a secure sum (bucketing) is not built yet")
    if cfg.asynchronous.mode != "none":
        why.append("[async]: buffers of one client each have nothing to hide the client in")
    if why:
        raise ConfigError(f"secure.method = {m!r} cannot run with " + "; ".join(why))
    neighbours = s.neighbours if m == "secagg+" else None
    if m == "secagg+" and neighbours is None:
        neighbours = 20
    if m == "secagg" and s.neighbours is not None:
        raise ConfigError('secure.neighbours applies to method "secagg+" (secagg is the complete graph)')
    if s.threshold is not None and neighbours is not None and s.threshold > neighbours:
        raise ConfigError(f"secure.threshold = {s.threshold} exceeds secure.neighbours = {neighbours}")
    max_weight = s.max_weight or float(max(c.n for c in fed.clients))
    return dataclasses.replace(algorithm, secure=SecureSum(
        s.clip, max_weight, s.bits, neighbours, s.threshold, s.dropout, s.dropout_stage))


def build_aggregator(cfg: Config, server_update=None):
    """``[aggregator]`` -> an Aggregator; refuses rules that another part of the run would bypass.
    ``server_update(params, key) -> delta``: FLTrust's training on its root data (``build``)."""
    from atoll import aggregators as A

    g, a = cfg.aggregator, cfg.algorithm
    _check_trust(g, server_update)
    if g.name == "mean" and not (g.nnm or g.bucket):
        return A.mean(a.weighting)
    where = {"algorithm.name": a.name if a.name in ("fednova", "scaffold", "fedagrac") else None,
             "privacy.mode": cfg.privacy.mode if cfg.privacy.mode == "dp_fedavg" else None,
             "async.mode": cfg.asynchronous.mode if cfg.asynchronous.mode != "none" else None,
             "algorithm.weighting": a.weighting if a.weighting != "samples" else None}
    for key, value in where.items():
        if value is not None:
            raise ConfigError(f"aggregator.name = {g.name!r} cannot be combined with {key} = {value!r}: "
                              "that part recomputes or reweighs the aggregate from the raw updates, "
                              "which would bypass the robust rule (use aggregator.name = 'mean')")

    def rule(name):
        make = {"mean": lambda: A.mean("uniform"), "median": A.median, "trimmed_mean": lambda: A.trimmed_mean(g.f),
                "krum": lambda: A.krum(g.f), "multi_krum": lambda: A.multi_krum(g.f, g.m),
                "bulyan": lambda: A.bulyan(g.f),
                "geometric_median": lambda: A.geometric_median(iters=max(g.iters, 100)),
                "centered_clipping": lambda: A.centered_clipping(g.tau, g.iters),
                "fltrust": lambda: A.fltrust(server_update), "flame": lambda: A.flame(g.lam, cfg.seed)}
        if name == "norm_bound":
            if g.c is None:
                raise ConfigError('aggregator.name = "norm_bound" needs aggregator.c (the L2 bound)')
            return A.norm_bound(g.c, rule(g.inner))
        return make[name]()

    agg = rule(g.name)
    if g.nnm:
        agg = A.nnm(g.f, agg)
    if g.bucket:
        agg = A.bucketing(g.bucket, agg, seed=cfg.seed)
    return agg


def _check_trust(g: AggregatorConfig, server_update) -> None:
    if g.name in ("fltrust", "flame") and (g.nnm or g.bucket):
        raise ConfigError(f"aggregator.name = {g.name!r} chooses whom to trust from the raw updates: "
                          "it cannot run after aggregator.nnm or aggregator.bucket")
    if g.root and g.name != "fltrust":
        raise ConfigError(f"aggregator.root = {g.root} is FLTrust's root data; aggregator.name = "
                          f"{g.name!r} does not use it")
    if g.name == "fltrust" and (not g.root or server_update is None):
        raise ConfigError('aggregator.name = "fltrust" needs root data: set aggregator.root to the '
                          "number of clean samples the server trains on (the paper uses 100), in a "
                          "simulation that loads [data]")


def _root_update(cfg: Config, model, local, fed):
    """FLTrust's ``server_update`` on ``aggregator.root`` clean training samples (before any
    data attack; ``algorithms.root``); a deployed client's stand-in data has none to give."""
    from atoll.algorithms.root import root_update

    g, c = cfg.aggregator, cfg.client
    if not g.root or not fed.clients or getattr(fed.clients[0], "x", None) is None:
        def no_root(params, key):
            raise RuntimeError("fltrust: the server update runs where the root data is (the server)")
        return no_root if g.root else None
    try:
        return root_update(model, local, fed.clients, g.root, cfg.seed, c.batch_size, c.steps, c.epochs)
    except ValueError as exc:
        raise ConfigError(f"aggregator.root = {g.root}: {exc}") from None


def _with_attack(cfg: Config, algorithm, fed):
    """``[attack]``: the adversary beside the aggregator, and the attackers' poisoned data."""
    import dataclasses

    from atoll import attacks

    t, n = cfg.attack, len(fed.clients)
    ids = t.clients if t.clients is not None else list(range(t.count))
    if not ids or any(not 0 <= i < n for i in ids):
        raise ConfigError(f"attack: attackers {ids} must be a non-empty list of client ids in [0, {n}) "
                          "(attack.clients, or attack.count > 0)")
    if t.target >= fed.n_classes:
        raise ConfigError(f"attack.target = {t.target} is not a class (the data has {fed.n_classes})")
    adv = attacks.Adversary(t.name, frozenset(ids), t.start_round, t.scale, t.sigma, t.eps)
    fed = attacks.poison(fed, adv, fed.n_classes, t.target, t.fraction)
    return dataclasses.replace(algorithm, adversary=adv), fed


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
    options = {"fedavgm": {"server_momentum": a.server_momentum}, "fedprox": {"mu": a.mu},
               "fedadam": {"b1": a.b1, "b2": a.b2, "tau": a.tau, "initial_v": a.initial_v},
               "fedyogi": {"b1": a.b1, "b2": a.b2, "tau": a.tau, "initial_v": a.initial_v},
               "fedadagrad": {"tau": a.tau, "initial_v": a.initial_v}, "fednova": {"momentum": c.momentum},
               "scaffold": {"local_lr": c.lr, "num_clients": len(fed.clients)},
               "fedagrac": {"local_lr": c.lr, "lam": a.lam, "form": a.form}}.get(a.name, {})
    if a.server_lr is not None:
        options["server_lr"] = a.server_lr
    if isinstance(a.weighting, list) and len(a.weighting) != len(fed.clients):
        raise ConfigError(f"algorithm.weighting lists {len(a.weighting)} weights for "
                          f"{len(fed.clients)} clients")
    trust = _root_update(cfg, model, local, fed) if cfg.aggregator.name == "fltrust" else None
    algorithm = algorithms.RECIPES[a.name](local, aggregator=build_aggregator(cfg, trust), **options)
    if cfg.attack.name != "none":
        algorithm, fed = _with_attack(cfg, algorithm, fed)
    algorithm = _with_comm(algorithm, cfg.comm, len(fed.clients))
    if cfg.secure.method != "none":
        algorithm = _with_secure(cfg, algorithm, fed)
    s = cfg.sampling
    devices, schedule, asynchronous = _heterogeneity(cfg, algorithm, model, len(fed.clients))
    work = LocalWork(batch_size=c.batch_size, epochs=None if c.steps else c.epochs, steps=c.steps,
                     stragglers=c.stragglers, drop_stragglers=c.drop_stragglers, schedule=schedule)
    plan = Plan(rounds=cfg.rounds, seed=cfg.seed, sampling=s.method,
                clients_per_round=s.clients_per_round, fraction=s.fraction, rate=s.rate,
                work=work, eval_every=cfg.eval.every, federated_eval=cfg.eval.federated,
                train_eval=cfg.eval.train_loss,
                checkpoint_every=cfg.checkpoint.every, devices=devices, asynchronous=asynchronous)
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
    return algorithm, model, fed, plan


def _with_watermark(cfg: Config, algorithm, model, fed):
    """``[watermark]``: the server optimizer followed by the trigger-set embedding."""
    from atoll import watermark as W

    w = cfg.watermark
    triggers = W.trigger_set(W.load_key(w.key_file, create=True), w.trigger_size, (fed.n_features,),
                             fed.n_classes, w.scale, next(model.parameters()).dtype)
    return W.with_watermark(algorithm, model, triggers, W.load_key(w.key_file), steps=w.steps,
                            lr=w.lr, every=w.every, batch=w.batch)


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
