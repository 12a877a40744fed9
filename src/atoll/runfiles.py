"""A run folder's files read back, each validated with errors that name the file and the line
(``metrics.jsonl``, ``timings.jsonl``, ``final.json``, ``config.toml``), and what the report and
the benches ask of the metric rows (``series``, ``reach``)."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path


def read_metrics(run_dir) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl``; errors name the file (and the line)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} is empty: the run has not finished a round")
    for i, row in rows:
        if not isinstance(row.get("round"), int):
            raise ValueError(f"{path}: line {i} has no integer 'round'")
    return [row for _, row in rows]


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {i} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: line {i} is not a JSON object")
        out.append((i, obj))
    return out


def series(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    """(x, y) pairs of the rows where both are present and not null."""
    pts = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def reach(rows: list[dict], target: float, x: str = "round"):
    """The first value of ``x`` at which ``test_acc`` >= target, or None."""
    for r in rows:
        if r.get("test_acc") is not None and r["test_acc"] >= target and r.get(x) is not None:
            return r[x]
    return None


def has(rows, key) -> bool:
    """Whether some row has a non-null ``key``."""
    return any(r.get(key) is not None for r in rows)


def last(rows, key):
    """The last non-null ``key`` of the rows, or None."""
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def read_json(path: Path) -> dict:
    """A JSON object file (``{}`` if it does not exist)."""
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON object")
    return obj


def read_toml(path: Path) -> dict:
    """A TOML file (``{}`` if it does not exist or does not parse: the report only shows it)."""
    try:
        return tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError:
        return {}
