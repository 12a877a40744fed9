"""A party's table (an id column, its feature columns, the label party's also the label column),
read from CSV and cut down to the aligned ids; shared by the deployment and the simulation.

Rows come out sorted by id, so row i is the same person at every party. Each party standardises
its own columns over the aligned rows (``standardise``)."""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Table:
    ids: list[str]
    columns: list[str]
    x: np.ndarray                 # float64, one row per id
    y: np.ndarray | None = None   # the label column (label party only)


def read_csv(path, id_column: str, label: str = "", columns: list[str] | None = None) -> Table:
    """``path``'s rows; errors name the file, the column and the row."""
    try:
        return _read(path, id_column, label, columns)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot be read as a UTF-8 CSV table ({exc})") from None


def _read(path, id_column: str, label: str, columns: list[str] | None) -> Table:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        head = reader.fieldnames or []
        cols = list(columns) if columns else [c for c in head if c not in (id_column, label)]
        missing = [c for c in [id_column, *cols, *([label] if label else [])] if c not in head]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (columns: {head})")
        ids, x, y = [], [], []
        for i, row in enumerate(reader, start=2):
            ids.append(row[id_column])
            x.append([_number(row[c], path, i, c) for c in cols])
            if label:
                y.append(_number(row[label], path, i, label))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: the id column {id_column!r} repeats an id")
    if not ids or not cols:
        raise ValueError(f"{path}: no rows or no feature columns")
    return Table(ids, cols, np.array(x, dtype=np.float64), np.array(y) if label else None)


def _number(v, path, line: int, col: str) -> float:
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: line {line}, column {col!r}: {str(v)[:40]!r} is not a number") from None
    if not np.isfinite(out):
        raise ValueError(f"{path}: line {line}, column {col!r} is not finite")
    return out


def aligned(t: Table, ids: list[str], standardise: bool, where: str = "table"):
    """(features, labels or None): ``t``'s rows of ``ids`` (sorted by the caller), as tensors."""
    pos = {v: i for i, v in enumerate(t.ids)}
    missing = [i for i in ids if i not in pos]
    if missing:
        raise ValueError(f"{where}: {len(missing)} aligned ids are not in the table, e.g. {missing[0]!r}")
    rows = [pos[i] for i in ids]
    x = t.x[rows]
    if standardise:
        x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    y = torch.tensor(t.y[rows], dtype=torch.float64) if t.y is not None else None
    return torch.from_numpy(np.ascontiguousarray(x)), y


def digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()
