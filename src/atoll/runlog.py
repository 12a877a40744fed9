"""The run log every driver writes: ``metrics.jsonl`` and ``timings.jsonl`` line by line,
``final.json`` and ``model.pt`` at the end, the progress bar, the ``Result``.

One run log and one metrics line serve the synchronous rounds (``simulation``), the
asynchronous scheduler (``asynchronous``) and the deployed coordinator. NaN or infinite numbers
(a diverged loss) are written as null: JSON has neither.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atoll import checkpoint, rundir
from atoll.evaluate import centralized, global_train_loss
from atoll.types import ServerState


@dataclass
class Result:
    state: ServerState
    metrics: list[dict]
    final: dict
    run_dir: Path | None


def round_line(r: int, stats, metrics: list[dict], **more) -> dict:
    """The metrics line of round ``r``, the same in every driver: the counts, training loss and
    bytes of ``stats`` (a ``runtime.base.RoundStats``), the cumulative bytes after the lines in
    ``metrics``, then ``more`` (privacy, byte ratios, the clock, staleness, ...), then the
    stragglers dropped and the failures, where there are any."""
    last = metrics[-1] if metrics else {}
    line = {"round": r, "train_loss": stats.train_loss, "clients_sampled": stats.sampled,
            "clients_succeeded": stats.succeeded, "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "bytes_up_cum": last.get("bytes_up_cum", 0) + stats.bytes_up,
            "bytes_down_cum": last.get("bytes_down_cum", 0) + stats.bytes_down, **more}
    if stats.stragglers_dropped:
        line["stragglers_dropped"] = stats.stragglers_dropped
    if stats.failures:
        line["failures"] = [[c, why] for c, why in stats.failures]
    return line


def evaluate_and_log(line: dict, plan, model, state, data, fed_eval, metrics: list,
                     run_dir, start: float) -> None:
    """Add the evaluation of round ``line["round"]`` when due, keep the line, and append it to
    ``metrics.jsonl`` (wall time to ``timings.jsonl``); shared by the synchronous and the
    asynchronous drivers. ``plan``: a ``simulation.Plan`` (``eval_every``, ``rounds``,
    ``train_eval`` are read)."""
    r = line["round"]
    if r % plan.eval_every == 0 or r == plan.rounds:
        line.update(centralized(model, state.params, data.x_test, data.y_test))
        if fed_eval is not None:
            line.update(fed_eval(model, state.params)[0])
        if plan.train_eval:
            line.update(global_train_loss(model, state.params, data.clients))
    metrics.append(line)
    if run_dir is not None:
        append(run_dir / "metrics.jsonl", line)
        append(run_dir / "timings.jsonl", {"round": r, "wall_s": round(time.perf_counter() - start, 4)})


def finish(model, state, data, fed_eval, run_dir, plots, extra=None) -> dict:
    final = {"rounds": state.round, **centralized(model, state.params, data.x_test, data.y_test),
             **(extra or {})}
    if fed_eval is not None:
        summary, per_client = fed_eval(model, state.params)
        final.update(summary, client_acc=per_client)
    if run_dir is not None:
        checkpoint.atomic_write(run_dir / "final.json", json.dumps(final, indent=1).encode())
        model.load_state_dict({k: v.detach().clone() for k, v in state.params.items()}, strict=False)
        torch.save(model.state_dict(), run_dir / "model.pt")
        if plots:
            from atoll.report import report
            report(run_dir)
    return final


def open_logs(run_dir: Path, resumed_round: int, config_text: str | None) -> list[dict]:
    """Start fresh logs, or on resume keep exactly the lines of rounds <= the checkpoint (a torn
    last line is dropped). ``config_text`` is written to ``config.toml`` (on resume it differs
    at most by a raised ``rounds``, ``rundir.check_resume``)."""
    if config_text is not None:
        checkpoint.atomic_write(run_dir / "config.toml", config_text.encode())
    kept = []
    for name in ("metrics.jsonl", "timings.jsonl", "anomaly.jsonl"):
        path = run_dir / name
        if name == "anomaly.jsonl" and not path.exists():
            continue  # written by robust rules only
        lines = rundir.read_log(path) if (resumed_round and path.exists()) else []
        lines = [ln for ln in lines if json.loads(ln)["round"] <= resumed_round]
        checkpoint.atomic_write(path, "".join(ln + "\n" for ln in lines).encode())
        if name == "metrics.jsonl":
            kept = [json.loads(ln) for ln in lines]
    return kept


def record_copies(algorithm, run_dir: Path) -> None:
    """``fingerprints.json``: what the per-client copies carry (``Algorithm.client_copy.record()``:
    each client's code), so that ``atoll audit watermark`` can name the client of a leaked copy."""
    if algorithm.client_copy is not None:
        checkpoint.atomic_write(run_dir / "fingerprints.json",
                                json.dumps(algorithm.client_copy.record(), indent=1).encode())


def append(path: Path, obj: dict) -> None:
    """One JSON line; a NaN or infinite number (a diverged loss) is written as null."""
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(obj), allow_nan=False) + "\n")


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class Progress:
    """A rich progress bar showing round, train loss, test accuracy and ETA (or nothing)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.bar = Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn())
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.done, info="")
            self.acc = None
        return self

    def update(self, line: dict) -> None:
        if not self.enabled:
            return
        self.acc = line.get("test_acc", self.acc)
        loss = line["train_loss"]
        info = f"loss {loss:.4f}" if loss is not None else "loss  —  "
        info += f"  acc {self.acc:.2%}" if self.acc is not None else ""
        self.bar.update(self.task, advance=1, info=info)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
