"""Atomic checkpoints of a run: server state, client states and the round reached.

Randomness is counter-based (``atoll.rng``), so the round number *is* the RNG position: a run
resumed from round r draws exactly what an uninterrupted run draws from round r+1 on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from atoll.types import ServerState

FILE = "checkpoint.pt"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(run_dir: Path, state: ServerState, client_states: dict[int, Any]) -> None:
    import io

    buf = io.BytesIO()
    torch.save({"format": 1, "round": state.round, "params": state.params,
                "opt_state": state.opt_state, "extra": state.extra,
                "client_states": client_states}, buf)
    atomic_write(Path(run_dir) / FILE, buf.getvalue())


def load(run_dir: Path) -> tuple[ServerState, dict[int, Any]]:
    path = Path(run_dir) / FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    ck = torch.load(path, weights_only=False)
    state = ServerState(ck["params"], ck["opt_state"], ck["round"], ck["extra"])
    return state, ck["client_states"]
