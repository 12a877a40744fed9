"""Run rounds: sample, let the runtime execute, evaluate, write metrics, checkpoint.

Run folder: ``metrics.jsonl`` (one deterministic JSON line per round: same config and seed give
a byte-identical file), ``anomaly.jsonl`` (robust rules: per-client scores and exclusions,
``aggregators.anomaly``), ``timings.jsonl`` (wall-clock seconds, kept apart because they differ
between runs), ``checkpoint.pt``, ``final.json``, ``model.pt``, ``plots/`` and ``summary.md``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atoll import checkpoint, rundir, sampling
from atoll import tree as T
from atoll.algorithm import Algorithm
from atoll.client import buffer_names, model_loss, params_of
from atoll.evaluate import FederatedEval
from atoll.runtime import make_runtime
from atoll.runlog import Progress as _Progress
from atoll.runlog import Result, json_safe  # noqa: F401 (re-exported)
from atoll.runlog import append as _append  # noqa: F401 (re-exported: deploy.coordinator)
from atoll.runlog import evaluate_and_log as _evaluate_and_log
from atoll.runlog import finish as _finish
from atoll.runlog import open_logs as _open_logs
from atoll.runlog import record_copies, round_line
from atoll.runtime.base import AllClientsFailed, LocalWork, check_round  # noqa: F401 (re-exported)
from atoll.transport import wire

log = logging.getLogger("atoll")


@dataclass(frozen=True)
class Plan:
    """Everything about a run that is not the algorithm, the model or the data."""

    rounds: int = 50
    seed: int = 0
    sampling: str = "fixed"
    clients_per_round: int | None = None
    fraction: float | None = None
    rate: float | None = None
    work: LocalWork = field(default_factory=LocalWork)
    eval_every: int = 1
    federated_eval: bool = True
    train_eval: bool = False
    personal_eval: bool = False  # each client's own model and new clients (atoll.personalization)
    new_clients: int = 0         # the last ``new_clients`` clients never train: new-client accuracy
    finetune: int = 0            # rounds of its own update a new client runs before it is evaluated
    checkpoint_every: int = 10
    privacy: Any = None  # atoll.privacy.run.PrivacySpec: per-round events and the budget
    devices: object | None = None       # atoll.devices.Devices: the simulated clock
    asynchronous: object | None = None  # atoll.asynchronous.AsyncPlan: event-driven training


def simulate(algorithm: Algorithm, model: torch.nn.Module, data, plan: Plan = Plan(), *,
             run_dir=None, runtime=None, resume: bool = False, overwrite: bool = False,
             progress: bool = False, config_text: str | None = None, plots: bool = True) -> Result:
    """Train ``model`` on federated ``data`` with ``algorithm`` for ``plan.rounds`` rounds.

    ``runtime``: default ``make_runtime()``, the vectorised runtime ``atoll run`` uses.
    ``run_dir`` must be empty or new unless ``resume`` (continue its checkpoint; ``config_text``
    may then only raise ``rounds``) or ``overwrite`` (remove the run there first).
    Raises ``AllClientsFailed`` when every sampled client of a round fails."""
    _check_copies(algorithm, runtime, plan)
    if plan.asynchronous is not None:
        from atoll.asynchronous import simulate_async

        return simulate_async(algorithm, model, data, plan, run_dir=run_dir, runtime=runtime,
                              resume=resume, overwrite=overwrite, progress=progress,
                              config_text=config_text, plots=plots)
    runtime = runtime or make_runtime()
    run_dir = Path(run_dir) if run_dir is not None else None
    client_update = algorithm.client(model_loss(model))
    fed_eval = FederatedEval(data.clients) if plan.federated_eval else None
    state = algorithm.init(params_of(model), buffers=buffer_names(model))
    client_states, metrics = {}, []
    if run_dir is not None:
        rundir.prepare(run_dir, resume=resume, overwrite=overwrite)
        if resume:
            rundir.check_resume(run_dir, config_text)
            state, client_states = checkpoint.load(run_dir)
        metrics = _open_logs(run_dir, state.round, config_text)
        record_copies(algorithm, run_dir)
    dense_up, dense_down = _float32_sizes(state.params)
    privacy = plan.privacy.driver(state) if plan.privacy is not None else None
    clock = None
    if plan.devices is not None:  # heterogeneous devices: the simulated clock (atoll.devices)
        from atoll.devices import Clock

        clock = Clock(plan.devices, plan.work, plan.seed, data,
                      start=metrics[-1].get("sim_time", 0.0) if metrics else 0.0)
    trained = len(data.clients) - plan.new_clients
    if plan.new_clients and not 0 < trained <= len(data.clients):
        raise ValueError(f"new_clients = {plan.new_clients} leaves no client to train "
                         f"(of {len(data.clients)})")
    personal = _personal(algorithm, client_update, model, data, plan, trained)
    start = time.perf_counter()
    with _Progress(progress, plan.rounds, state.round) as bar:
        while state.round < plan.rounds:
            r = state.round + 1
            if privacy is not None and privacy.before_round(r):
                break  # the budget would be exceeded: stop cleanly (checkpoint and final eval below)
            cohort = sampling.sample(trained, r, plan.seed, method=plan.sampling,
                                     count=plan.clients_per_round, fraction=plan.fraction,
                                     rate=plan.rate)
            if clock is not None:
                cohort = clock.start_round(cohort)
            state, client_states, stats = runtime.run_round(
                algorithm, client_update, state, client_states, cohort, data, plan.work, plan.seed)
            privacy_line = {}
            if privacy is not None:
                state, privacy_line = privacy.after_round(state)
            more = {**privacy_line, **_byte_ratios(stats, dense_up, dense_down), **stats.extra}
            if clock is not None:
                more.update(clock.end_round(cohort, stats, r))
            line = round_line(r, stats, metrics, **more)
            if personal is not None and (r % plan.eval_every == 0 or r == plan.rounds):
                line.update(personal(state, client_states))
            _evaluate_and_log(line, plan, model, state, data, fed_eval, metrics, run_dir, start)
            if run_dir is not None and state.extra.get("anomaly", {}).get("round") == r:
                _append(run_dir / "anomaly.jsonl", state.extra["anomaly"])  # robust rules' scores
            check_round(stats, r)  # every client failed: stop, the cause is in the line above
            if run_dir is not None:
                if r % plan.checkpoint_every == 0 or r == plan.rounds:
                    checkpoint.save(run_dir, state, client_states)
            bar.update(line)
    if privacy is not None and privacy.stopped:
        log.warning(privacy.stopped)
        if run_dir is not None:
            checkpoint.save(run_dir, state, client_states)
    extra = {"privacy": privacy.summary()} if privacy is not None else {}
    if personal is not None:
        extra.update(personal(state, client_states))
    final = _finish(model, state, data, fed_eval, run_dir, plots, extra)
    return Result(state, metrics, final, run_dir)


def _check_copies(algorithm, runtime, plan) -> None:
    """Refuse per-client copies (``Algorithm.client_copy``: ``watermark.fingerprint``) where the
    clients would share one broadcast: asynchronous groups, runtimes that do not declare
    ``client_copies`` (the vectorised and Ray runtimes)."""
    if algorithm.client_copy is None:
        return
    if plan.asynchronous is not None:
        raise ValueError("per-client copies (watermark.fingerprint) need synchronous rounds: the "
                         "asynchronous scheduler's groups share one broadcast")
    runtime = runtime or make_runtime()
    if not getattr(runtime, "client_copies", False):
        raise ValueError(f"per-client copies (watermark.fingerprint): the {runtime.name} runtime "
                         "trains its clients on one shared broadcast; use LoopRuntime "
                         "(runtime.name = \"loop\")")


def _personal(algorithm, client_update, model, data, plan, trained):
    """``(state, client_states) -> metrics`` of ``atoll.personalization``, or None when off."""
    if not plan.personal_eval:
        return None
    from atoll import personalization

    return lambda state, client_states: personalization.evaluate(
        algorithm, client_update, model, state, client_states, data.clients, trained,
        plan.finetune, plan.work, plan.seed)


def _float32_sizes(params) -> tuple[int, int]:
    """Bytes of one uncompressed float32 update and one float32 broadcast of the model: the
    reference the compression ratios in the metrics are taken against."""
    f32 = {k: v.to(torch.float32) for k, v in params.items()}
    return (len(wire.dumps(T.join({"delta": f32, "aux": {}}))),
            len(wire.dumps(T.join({"params": f32}))))


def _byte_ratios(stats, dense_up: int, dense_down: int) -> dict:
    """Mean bytes per sampled client in each direction, and the compression ratio against
    float32 (``> 1`` means fewer bytes than sending the float32 model)."""
    n = max(stats.sampled, 1)
    out = {"bytes_up_mean": round(stats.bytes_up / n, 1), "bytes_down_mean": round(stats.bytes_down / n, 1)}
    if stats.bytes_up:
        out["ratio_up"] = round(dense_up * n / stats.bytes_up, 3)
    if stats.bytes_down:
        out["ratio_down"] = round(dense_down * n / stats.bytes_down, 3)
    return out
