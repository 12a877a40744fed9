"""A deployed client's own policy: what it accepts from a server it does not fully trust.

The server sends the run's config at ``Join`` and a task every round. A client holds its own
``Policy`` (a TOML file, ``atoll client`` flags, or ``Client(policy=...)``) and a ``Guard``
checks the server's choices against it *before* they take effect: the join reply's sizes
before anything is parsed, the model name before anything is imported, the config's paths
before anything is opened, the model's size (built on the ``meta`` device, no memory) before
it is built, the privacy the built run gives *against the server* before the first task, and
each task (its round, its local steps, the epsilon this client will have spent once it answers)
before any training. A refusal raises ``PolicyError`` naming the field, the server's value and
the policy's bound; it is final for the run (``atoll client`` exits with status 2).

Epsilon is the client's own accounting: the events of the private client half this client
built from the config, composed once per task it answers, at the policy's ``delta``,
``accountant`` and ``neighboring``; the server's ``target_epsilon`` and ``delta`` play no part.
The default accountant is RDP: composing any number of rounds costs the same (PLD took 58 s
for 5,000 Gaussian rounds, time a server could make a client spend), and its epsilon bounds
PLD's from above; intrinsic mode's events, which RDP cannot compose, use PLD.
Modes whose noise is added by the server (``dp_fedavg``) or absent (``none``) give no privacy
against the server: their epsilon is infinite.
"""
from __future__ import annotations

import json
import logging
import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atoll.config import PrivacyConfig
from atoll.models.zoo import MODELS

ZOO = list(MODELS)  # the model zoo: code that ships with atoll
MODES = PrivacyConfig.model_fields["mode"].annotation  # the privacy.mode names of a config
log = logging.getLogger("atoll.deploy")
POISSON = ("dp_sgd", "intrinsic")  # modes whose batches are Poisson samples of records


class PolicyError(ValueError):
    """The server asked for something this client's policy does not allow (final for the run)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrivacyPolicy(_Section):
    modes: list[MODES] | None = None                     # allowed privacy.mode values (None: any)
    max_epsilon: float | None = Field(None, gt=0)        # against the server, over this run
    delta: float = Field(1e-5, gt=0, lt=1)               # the delta max_epsilon is stated at
    accountant: Literal["rdp", "pld"] = "rdp"  # rdp: fast for any count; pld: tighter, slower
    neighboring: Literal["add_remove", "replace_one"] = "add_remove"
    min_noise_multiplier: float | None = Field(None, ge=0)


class TrainingPolicy(_Section):
    min_batch_size: int = Field(1, ge=1)  # Poisson modes: expected batch sample_rate * N
    min_steps: int = Field(1, ge=1)       # local steps per task (stragglers and schedules included)


class SecurePolicy(_Section):
    require: bool = False             # refuse a run whose updates do not go into a secure sum
    min_cohort: int = Field(2, ge=2)  # the fewest clients in any secure sum this client joins
    he_public_key: str | None = None  # ckks / paillier: the dealer's public.key this client pins
    malicious: bool = False           # refuse a secure sum not run against a malicious server


class ModelsPolicy(_Section):
    allow: list[str] = ZOO  # zoo names and "package.module:Class" paths the owner trusts


class LimitsPolicy(_Section):
    max_task_mb: float = Field(256.0, gt=0)    # one task download (and the model's parameters)
    max_config_kb: float = Field(256.0, gt=0)  # the config text of the join reply
    max_clients: int = Field(1_000_000, ge=1)  # the population size the server announces
    max_steps: int = Field(100_000, ge=1)      # local steps per task


class Policy(_Section):
    privacy: PrivacyPolicy = PrivacyPolicy()
    training: TrainingPolicy = TrainingPolicy()
    secure: SecurePolicy = SecurePolicy()
    models: ModelsPolicy = ModelsPolicy()
    limits: LimitsPolicy = LimitsPolicy()

    @property
    def max_task_bytes(self) -> int:
        return int(self.limits.max_task_mb * 2**20)


def load(source=None, overrides: dict | None = None) -> Policy:
    """A ``Policy`` from a TOML file path (or a dict, or a ``Policy``), then ``overrides``
    (``{"privacy.max_epsilon": 4.0, ...}``; ``None`` values are ignored)."""
    if isinstance(source, Policy):
        raw, where = source.model_dump(), "policy"
    elif isinstance(source, dict):
        raw, where = source, "policy"
    elif source is None:
        raw, where = {}, "policy"
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"policy file {path} does not exist")
        try:
            raw, where = tomllib.loads(path.read_text()), str(path)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            section, leaf = key.split(".")
            raw.setdefault(section, {})[leaf] = value
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{where}: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {json.dumps(e.get('input'), default=str)})"
            for e in exc.errors())) from None


def _refuse(field: str, value, bound: str) -> PolicyError:
    return PolicyError(f"refused by this client's policy: the server's {field} = {value!r} "
                       f"{bound}")


class Guard:
    """The policy applied to one run: ``config`` at join, ``built`` after the build, then
    ``before_task`` for every task (which also charges the task to the client's ledger)."""

    def __init__(self, policy: Policy, ledger_path=None):
        self.policy, self.ledger_path = policy, Path(ledger_path) if ledger_path else None
        self.events, self.answered, self.run_id, self.plan = (), 0, None, None

    # ---- at join: before parsing, importing, opening or allocating ---------------------------
    def config(self, info: dict, run_id: str):
        """The server's config, parsed only after the join reply's sizes are checked; refuses
        models outside the allow-list, server-named paths and oversized models."""
        from atoll import config as C

        lim = self.policy.limits
        text = info["config_toml"]
        if len(text.encode()) > lim.max_config_kb * 1024:
            raise _refuse("config text", f"{len(text.encode())} bytes",
                          f"exceeds limits.max_config_kb = {lim.max_config_kb:g}")
        if self.run_id is not None and run_id != self.run_id:
            raise PolicyError(f"the server now sends another config (run {run_id}, was "
                              f"{self.run_id}): a client serves one run; start it again to join another")
        if not 1 <= info["num_clients"] <= lim.max_clients:
            raise _refuse("num_clients", info["num_clients"],
                          f"is outside [1, limits.max_clients = {lim.max_clients}]")
        if info["n_features"] < 1 or info["n_classes"] < 1:
            raise _refuse("n_features / n_classes", (info["n_features"], info["n_classes"]),
                          "must be positive")
        cfg = C.load(text=text)
        allow = self.policy.models.allow
        if cfg.model.name not in allow:  # checked on the string: nothing is imported before
            raise _refuse("model.name", cfg.model.name, f"is not in models.allow = {allow} "
                          "(a server never names code this client imports)")
        for key in ("csv", "trace"):  # the only config paths a client's build would open
            if getattr(cfg.devices, key) is not None:
                raise _refuse(f"devices.{key}", getattr(cfg.devices, key),
                              "is a path: a client never opens a file the server names")
        size = model_bytes(cfg, info["n_features"], info["n_classes"])
        if size > self.policy.max_task_bytes:
            raise _refuse("model", f"{size} bytes of parameters",
                          f"exceeds limits.max_task_mb = {lim.max_task_mb:g}")
        self._load_ledger(run_id)
        return cfg

    # ---- after the build: the privacy and the work the client will really do ----------------
    def built(self, cfg, plan, n: int, cid: int) -> None:
        p, t = self.policy.privacy, self.policy.training
        mode = cfg.privacy.mode
        if p.modes is None and p.max_epsilon is None and p.min_noise_multiplier is None:
            log.warning("this client's policy sets no privacy floor: it accepts privacy.mode = %r "
                        "and whatever the server's config says (see 'Client policy' in "
                        "docs/deployment.md)", mode)
        if p.modes is not None and mode not in p.modes:
            raise _refuse("privacy.mode", mode, f"is not in privacy.modes = {p.modes}")
        sec = self.policy.secure
        if sec.require and cfg.secure.method == "none":
            raise _refuse("secure.method", cfg.secure.method, "is not a secure sum, and the policy "
                          "sets secure.require = true (the server would see this client's update)")
        if cfg.secure.method in ("ckks", "paillier") and sec.he_public_key is None:
            raise _refuse("secure.method", cfg.secure.method, "encrypts under a public key this "
                          "client must pin itself (policy secure.he_public_key, --he-public-key): "
                          "it never takes one from the server")
        if self.policy.secure.malicious and not (cfg.secure.method != "none" and cfg.secure.malicious):
            raise _refuse("secure.malicious", cfg.secure.malicious, "is not true, and the policy sets "
                          "secure.malicious = true (SecAgg: a server could swap keys or split the "
                          "survivor view; HE: it could have one client's ciphertext decrypted)")
        spec = getattr(plan, "privacy", None)
        details = spec.details if spec is not None else {}
        if p.min_noise_multiplier is not None:
            z = details.get("noise_multiplier", 0.0 if mode == "none" else None)
            if z is None:
                raise _refuse("privacy.mode", mode, "has no noise multiplier, and the policy sets "
                              "privacy.min_noise_multiplier (bound it with max_epsilon instead)")
            field = "privacy.noise_multiplier"
            if mode == "dp_fedavg":  # the server adds that noise: none protects from the server
                z, field = 0.0, "privacy.noise_multiplier added by this client (dp_fedavg: none)"
            if z < p.min_noise_multiplier:
                raise _refuse(field, z,
                              f"is below privacy.min_noise_multiplier = {p.min_noise_multiplier:g}")
        if mode in POISSON:
            q = details["sample_rate"]
            batch, what = q * n, f"privacy.sample_rate ({q:g}) x this client's {n} records"
        else:
            batch, what = min(cfg.client.batch_size, n), "client.batch_size"
        if batch < t.min_batch_size:
            raise _refuse(what, batch, f"is below training.min_batch_size = {t.min_batch_size}")
        # the ledger's events: those of this client's own stages (none when the server sees the
        # update in clear or adds the noise itself)
        self.events = spec.client_events if spec is not None else ()
        self.rounds, self.plan, self.n, self.cid = cfg.rounds, plan, n, cid
        if p.max_epsilon is not None:
            eps = self.epsilon(cfg.rounds)
            if eps > p.max_epsilon:
                why = ("the server sees the update without noise" if not self.events else
                       f"its {cfg.rounds} rounds spend epsilon {eps:.4g} at delta {p.delta:g}")
                raise _refuse("privacy", f"mode {mode!r}", f"gives no protection within "
                              f"privacy.max_epsilon = {p.max_epsilon:g} against the server: {why}")

    def epsilon(self, tasks: int) -> float:
        """This client's epsilon against the server after answering ``tasks`` tasks."""
        if tasks == 0:
            return 0.0
        if not self.events:
            return math.inf
        from atoll.privacy.accountant import Accountant

        p = self.policy.privacy
        for kind in dict.fromkeys((p.accountant, "pld", "rdp")):  # rdp cannot compose intrinsic
            acc = Accountant(kind, p.neighboring)                 # mode's events, pld not the
            try:                                                  # distributed mode's zCDP
                for event, count in self.events:
                    acc.step(event, count * tasks)
                return acc.epsilon(p.delta)
            except ValueError:
                continue
        return math.inf

    # ---- every task ---------------------------------------------------------------------------
    def before_task(self, r: int) -> None:
        """Refuse a task outside the run, with too few or too many local steps, or one whose
        answer would take this client past ``max_epsilon``; else charge it to the ledger."""
        from atoll.runtime.base import active_steps

        if not 1 <= r <= self.rounds:
            raise _refuse("task round", r, f"is outside the run's rounds 1..{self.rounds}")
        w, t, lim = self.plan.work, self.policy.training, self.policy.limits
        total = w.round_steps(self.cid, r, self.plan.seed, self.n)
        if total > lim.max_steps:
            raise _refuse(f"round {r} local steps", total, f"exceed limits.max_steps = {lim.max_steps}")
        steps = active_steps(self.cid, r, self.plan.seed, w, self.n)
        if steps < t.min_steps:
            raise _refuse(f"round {r} local steps", steps,
                          f"are below training.min_steps = {t.min_steps}")
        bound = self.policy.privacy.max_epsilon
        if bound is not None and self.epsilon(self.answered + 1) > bound:
            raise _refuse(f"task for round {r}", f"answer {self.answered + 1}",
                          f"would take this client past privacy.max_epsilon = {bound:g} "
                          f"(epsilon {self.epsilon(self.answered + 1):.4g} against the server)")
        self.answered += 1  # charged before the update leaves: the server may keep it anyway
        self._save_ledger()

    def _load_ledger(self, run_id: str) -> None:
        self.run_id, self.answered = run_id, 0
        if self.ledger_path is not None and self.ledger_path.is_file():
            try:
                saved = json.loads(self.ledger_path.read_text())
                if saved.get("run") == run_id and isinstance(saved.get("answered"), int):
                    self.answered = max(0, saved["answered"])
            except (ValueError, AttributeError):
                raise PolicyError(f"{self.ledger_path}: unreadable privacy ledger; this client "
                                  "cannot tell how much of its budget is spent") from None

    def _save_ledger(self) -> None:
        if self.ledger_path is not None:
            from atoll.checkpoint import atomic_write

            atomic_write(self.ledger_path, json.dumps({"run": self.run_id,
                                                       "answered": self.answered}).encode())


def model_bytes(cfg, n_features: int, n_classes: int) -> int:
    """Bytes of the config's model parameters, built on the ``meta`` device (nothing allocated).
    Call only after the model name passed the allow-list: building imports a custom class."""
    import torch

    from atoll import models

    kwargs = dict(cfg.model.kwargs, **({"hidden": cfg.model.hidden} if cfg.model.hidden else {}))
    try:
        with torch.device("meta"):
            model = models.build(cfg.model.name, n_features, n_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"the server's model {cfg.model.name!r} with {kwargs} cannot be "
                          f"built: {exc}") from None
    return sum(p.numel() for p in model.parameters()) * (8 if cfg.dtype == "float64" else 4)
