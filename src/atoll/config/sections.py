"""The sections of an experiment file, one pydantic model each, and ``Config`` holding them.

Every section forbids unknown keys; a bad value names the field and the accepted range
(``atoll.config.files`` turns pydantic's errors into those messages).
"""
from __future__ import annotations

from pathlib import Path

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from atoll.config.vertical import VerticalConfig


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
    # transfer learning (docs/transfer.md): start from a model file (a run's model.pt), taking the
    # entries whose names start with ``init_only`` (default: all); never train ``freeze``'s
    init: str | None = None
    init_only: list[str] | None = None
    freeze: list[str] = []


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
                  "fednova", "scaffold", "fedagrac", "ditto", "fedper", "fedrep",
                  "fedbn", "lg_fedavg", "apfl", "pfedme", "per_fedavg"] = "fedavg"
    server_lr: float | None = Field(None, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)
    mu: float = Field(0.01, ge=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    initial_v: float | None = Field(None, ge=0)  # fedadam/fedyogi/fedadagrad: v_-1; None = tau^2 (Reddi et al.)
    weighting: Literal["samples", "uniform"] | list[float] = "samples"  # or one weight per client
    lam: float | None = Field(None, ge=0)  # fedagrac: lambda (default 0.1 seed form, 0.03 published); ditto: lambda (default 0.1); pfedme: lambda (default 15, > 0)
    head: str | None = None  # fedper/fedrep: parameter-name prefix of the local head (default: the last layer)
    head_epochs: int = Field(1, ge=1)       # fedrep: passes over the round's batches training the head first
    alpha: float = Field(0.25, ge=0, le=1)  # apfl: the initial mixing weight
    alpha_step: float = Field(0.1, ge=0)    # apfl: alpha's learning rate relative to the local one
    inner_lr: float | None = Field(None, gt=0)  # pfedme: step of the personal problem (default 0.05); per_fedavg: alpha (default 0.01)
    inner_steps: int = Field(5, ge=1)       # pfedme: K, steps on the personal problem per local step
    variant: Literal["fo", "hf"] = "fo"     # per_fedavg: first-order or Hessian-free meta-gradient
    delta: float = Field(1e-3, gt=0)        # per_fedavg hf: finite-difference step of the Hessian-vector product
    adapt_steps: int = Field(1, ge=0)       # per_fedavg: steps of fine-tuning (step inner_lr) that make a client's model
    form: Literal["seed", "published"] = "seed"  # fedagrac: the patent's calibration (CN 112990488 B) or the paper code's


class AggregatorConfig(_Section):
    """How the server combines the cohort's updates (``atoll.aggregators``; docs/robustness.md)."""

    name: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
                  "geometric_median", "centered_clipping", "norm_bound", "fltrust", "flame", "rlr"] = "mean"
    f: int = Field(0, ge=0)                     # attackers the rule tolerates per cohort
    m: int | None = Field(None, ge=1)           # multi_krum: how many updates to average
    # centered_clipping radius, or "median": each iteration's median distance from the centre
    # (over secure buckets of s, aggregator.bucket under [secure]: that median / sqrt(s))
    tau: Annotated[float, Field(gt=0, strict=True)] | Literal["median"] = 10.0
    iters: int = Field(1, ge=1)                 # centered_clipping / geometric_median iterations
    c: Annotated[float, Field(gt=0)] | Literal["median"] | None = None  # norm_bound: bound or "median"
    inner: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
                   "norm_bound"] = "mean"               # norm_bound's / rlr's inner rule (norm_bound: rlr only)
    theta: int | None = Field(None, ge=1, strict=True)       # rlr: least |sum of signs| that keeps a coordinate's sign
    nnm: bool = False                           # nearest-neighbour mixing before the rule
    arc: bool = False                           # adaptive robust clipping (ARC) first, needs f >= 1
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
    personal: bool = False            # pers_acc_* (each client's own model), new_acc_* (new clients)
    new_clients: int = Field(0, ge=0)  # the last new_clients clients never train (new-client accuracy)
    finetune: int = Field(0, ge=0)     # rounds of its own update a new client runs before evaluation


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

    mode: Literal["none", "dp_sgd", "dp_fedavg", "local", "intrinsic", "distributed"] = "none"
    accountant: Literal["pld", "rdp", "rdp_classic"] = "pld"
    neighboring: Literal["add_remove", "replace_one"] = "add_remove"
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    clip: float = Field(1.0, gt=0)
    aux_clip: float | None = Field(None, gt=0)  # dp_fedavg/local: clip of SCAFFOLD's/FedaGrac's aux; default clip
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

    method: Literal["none", "secagg", "secagg+", "ckks", "paillier"] = "none"  # secagg: complete graph
    # ckks / paillier: homomorphic sum; trust model: the secret key is held by a key holder that
    # is not the server (never by the clients); key holder + server together see every update
    decryptors: int = Field(2, ge=1)  # paillier: parties sharing the secret exponent (1: one key holder)
    clip: float = Field(0.1, gt=0)          # per-coordinate range of an update: [-clip, clip]
    bits: int = Field(16, ge=2, le=24)      # bits per coordinate of a client's input
    neighbours: int | None = Field(None, ge=2)  # secagg+: default 20 (or everyone, if fewer)
    threshold: int | None = Field(None, ge=1)   # default neighbours // 2 + 1
    # public bound on a client's record count (default: the largest; with aggregator.bucket: 1,
    # every client counts one in its bucket's mean, as the robust rules weigh rows in plaintext)
    max_weight: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # simulation: this fraction vanishes mid-protocol
    dropout_stage: int = Field(3, ge=1, le=5)  # ... before stage 1 keys, 2 shares, 3 input, 4 unmask
    # secagg / secagg+ against a malicious server: signed keys and a consistency check (stage 4,
    # the unmasking becomes 5); deployment needs certificate-enrolled clients
    malicious: bool = False
    stage_timeout: float = Field(30.0, gt=0)  # deployment: seconds to wait for one stage's answers
    # deployment: a stage closes once this share of its clients answered, plus as long again
    stage_quorum: float = Field(1.0, gt=0, le=1)


class WatermarkConfig(_Section):
    """Server-side trigger-set watermark (``atoll.watermark``; docs/watermark.md); off while
    enabled = false. The key file is the server's secret: created if missing, never sent."""

    enabled: bool = False
    key_file: str = ""  # "": <out_dir>/watermark.key (beside the run folders, never inside one)
    trigger_size: int = Field(50, ge=1)
    scale: float = Field(6.0, gt=0)  # triggers are uniform on [-scale, scale]
    steps: int = Field(5, ge=1)      # SGD steps on the trigger set after a server step
    lr: float = Field(0.05, gt=0)
    batch: int = Field(50, ge=1)
    every: int = Field(1, ge=1)      # embed after every k-th server step
    preserve: float = Field(0.0, ge=0)  # weight of the KL term keeping outputs on noise anchors
    anchors: int = Field(256, ge=1, le=65536)  # standard-normal inputs the KL term is taken on
    until: float = Field(1.0, gt=0)  # stop a round's steps at this trigger accuracy (> 1: never)
    layers: list[str] = []              # train only entries starting with these (default: all)
    fingerprint: bool = False        # deployment: each client gets its own traceable copy


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
    vertical: VerticalConfig | None = None  # a vertical run (atoll.vertical.experiment)

    @property
    def watermark_key_file(self) -> str:
        """The server's watermark key: ``watermark.key_file``, by default in ``out_dir``."""
        return self.watermark.key_file or str(Path(self.out_dir) / "watermark.key")
