"""Checkpoints of a vertical run's parties, shared by ``atoll run`` (``vertical.experiment``: every
party in one file) and the deployed run (``atoll vertical serve|connect --run-dir``: each party
its own files, ``checkpoint-<epoch>.pt`` in its own run folder, the two latest kept).

A checkpoint is a dict of tensors and plain data (``torch.save``), written atomically
(``atoll.checkpoint.atomic_write``) and read back without unpickling objects, after its size is
checked against what this party's models can need. What is in it is checked before it replaces
anything: the format, the epoch (in range), the run it belongs to, and every tensor's shape, dtype
and finiteness against the live model (``check_tensors``, ``load_optimizer``).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path

import torch

from atoll.checkpoint import atomic_write, load_file

FORMAT = "atoll-vertical-1"
FILE = re.compile(r"checkpoint-(\d{1,9})\.pt")
RUN_ID = re.compile(r"[0-9a-f]{32}")


def pack(**fields) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **fields}, buf)
    return buf.getvalue()


def size_limit(*trees, floats: int = 0) -> int:
    """Bytes a checkpoint of these states (models, optimizers) and ``floats`` losses may take:
    three copies of every tensor (Adam keeps two moments per weight), 32 bytes a loss, 1 MiB."""
    tensors = [t for tree in trees for t in _leaves(tree) if isinstance(t, torch.Tensor)]
    return 3 * sum(t.numel() * t.element_size() for t in tensors) + 32 * floats + (1 << 20)


def read(path: Path, limit: int, epochs: int | None = None) -> dict:
    """The checkpoint at ``path``: at most ``limit`` bytes, a dict of this format whose ``epoch``
    is an int in 1..``epochs`` (any positive one if None); ValueError naming the file if not."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"checkpoint {path} has {size} bytes, more than this run's models can need ({limit})")
    ck = load_file(path, "checkpoint")
    e = ck.get("epoch")
    if ck.get("format") != FORMAT or not isinstance(e, int) or isinstance(e, bool) \
            or not 0 < e <= (epochs if epochs is not None else 10**9):
        raise ValueError(f"{path} is not a checkpoint of a vertical run"
                         + (f" of {epochs} epochs" if epochs is not None else "") + f" (epoch {str(e)[:20]})")
    bad = [k for k, t in _named_leaves(ck) if isinstance(t, torch.Tensor) and t.is_floating_point()
           and not bool(torch.isfinite(t).all()) or isinstance(t, float) and not math.isfinite(t)]
    if bad:
        raise ValueError(f"{path}: {bad[0]!r} holds NaN or infinite values")
    return ck


def losses(ck: dict, per_epoch: int, path) -> list[float]:
    """The checkpoint's step losses: ``per_epoch`` floats for each of its epochs."""
    out, e = ck.get("losses"), ck["epoch"]
    if not isinstance(out, list) or len(out) != e * per_epoch or not all(type(v) is float for v in out):
        raise ValueError(f"{path}: 'losses' does not hold the {e} epochs' step losses")
    return out


def binding(cfg: dict, digest: str) -> str:
    """What a party's checkpoint is bound to: its settings (not where its files are, nor the
    timeout), the SHA-256 of the aligned ids and of its table."""
    data = hashlib.sha256(Path(cfg["data"]).read_bytes()).hexdigest() if cfg.get("data") else ""
    own = {k: v for k, v in cfg.items() if k not in ("data", "ids", "timeout")}
    return hashlib.sha256(json.dumps([own, digest, data], sort_keys=True, default=str).encode()).hexdigest()


def held(run_dir: Path) -> list[int]:
    """The epochs of the checkpoints in ``run_dir``, ascending."""
    return sorted(int(m.group(1)) for p in Path(run_dir).glob("checkpoint-*.pt") if (m := FILE.fullmatch(p.name)))


def write(run_dir: Path, epoch: int, data: bytes) -> None:
    """``checkpoint-<epoch>.pt`` atomically, then every other one but the epoch before removed."""
    atomic_write(Path(run_dir) / f"checkpoint-{epoch}.pt", data)
    for e in held(run_dir):
        if e not in (epoch, epoch - 1):
            (Path(run_dir) / f"checkpoint-{e}.pt").unlink(missing_ok=True)


def clear(run_dir: Path) -> None:
    for e in held(run_dir):
        (Path(run_dir) / f"checkpoint-{e}.pt").unlink(missing_ok=True)


def check_tensors(got, like: dict, what: str) -> dict:
    """``got`` if it holds exactly ``like``'s keys, each a finite tensor of its shape and dtype."""
    if not isinstance(got, dict) or set(got) != set(like):
        names = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise ValueError(f"{what}: holds {str(names)[:200]}, expected {sorted(like)}")
    for k, ref in like.items():
        t = got[k]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
            raise ValueError(f"{what}: {k!r} is not a {ref.dtype} tensor of shape {tuple(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: {k!r} holds NaN or infinite values")
    return got


def load_optimizer(opt: torch.optim.Optimizer, state, what: str) -> None:
    """``opt.load_state_dict(state)``, then every per-weight tensor checked against its weight."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        for p in group["params"]:
            for k, t in opt.state.get(p, {}).items():
                if isinstance(t, torch.Tensor) and (t.dim() and (t.shape != p.shape or t.dtype != p.dtype)
                                                    or not bool(torch.isfinite(t).all())):
                    raise ValueError(f"{what}: optimizer state {k!r} does not fit a weight of shape "
                                     f"{tuple(p.shape)} ({p.dtype}) or is not finite")


def _leaves(tree):
    return [t for _, t in _named_leaves(tree)]


def _named_leaves(tree, name: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _named_leaves(v, f"{name}.{k}" if name else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _named_leaves(v, f"{name}[{i}]")
    else:
        yield name, tree
