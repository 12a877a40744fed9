"""The CSV files of ``[devices]``, read and validated row by row with errors that name the file,
the line and the column: the device profile (``client, speed, up, down[, steps]``) and the
availability trace (``client, start, end``)."""
from __future__ import annotations

import csv
from pathlib import Path

import torch


def read_profile(path, num_clients: int, base: torch.Tensor):
    """``devices.csv``: ``base`` (N, 3) with the speed, up and down of the listed clients set, and
    the fixed steps per client (``()`` if the file has no steps column)."""
    rows = _read_csv(path, "devices.csv", ("client", "speed", "up", "down"))
    steps = [None] * num_clients
    for i, row in rows:
        cid = _client(row, i, path, num_clients)
        for j, col in enumerate(("speed", "up", "down")):
            v = _float(row, col, i, path)
            if not v > 0:
                raise ValueError(f"{path}: line {i}: {col} must be > 0, got {v}")
            base[cid, j] = v
        if row.get("steps") not in (None, ""):
            steps[cid] = int(_float(row, "steps", i, path))
    fixed = tuple(steps) if all(s is not None for s in steps) else ()
    if any(s is not None for s in steps) and not fixed:
        raise ValueError(f"{path}: the steps column must be given for every client or none")
    return base, fixed


def read_trace(path, num_clients: int) -> dict[int, tuple]:
    """``devices.trace``: client -> its online intervals ``(start, end)``, sorted."""
    spans: dict[int, list] = {}
    for i, row in _read_csv(path, "devices.trace", ("client", "start", "end")):
        cid = _client(row, i, path, num_clients)
        start, end = _float(row, "start", i, path), _float(row, "end", i, path)
        if not 0 <= start < end:
            raise ValueError(f"{path}: line {i}: need 0 <= start < end, got {start}, {end}")
        spans.setdefault(cid, []).append((start, end))
    return {c: tuple(sorted(s)) for c, s in spans.items()}


def _read_csv(path, key: str, columns: tuple[str, ...]) -> list[tuple[int, dict]]:
    if path is None:
        raise ValueError(f"{key} must name a CSV file")
    if not Path(path).exists():
        raise ValueError(f"{key}: file {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(columns)}")
        return list(enumerate(reader, start=2))


def _client(row, i, path, num_clients) -> int:
    try:
        cid = int(row["client"])
    except ValueError:
        raise ValueError(f"{path}: line {i}: client {row['client']!r} is not an integer") from None
    if not 0 <= cid < num_clients:
        raise ValueError(f"{path}: line {i}: client {cid} is not in [0, {num_clients})")
    return cid


def _float(row, col, i, path) -> float:
    try:
        return float(row[col])
    except (TypeError, ValueError):
        raise ValueError(f"{path}: line {i}: {col} {row[col]!r} is not a number") from None
