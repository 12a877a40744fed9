"""Atomic checkpoints of a run: server state, client states and the round reached.

Randomness is counter-based (``atoll.rng``), so the round number *is* the RNG position: a run
resumed from round r draws exactly what an uninterrupted run draws from round r+1 on.

Client states held in a ``ClientStore`` are not pickled client by client: the rows of the
clients that have a state are streamed, leaf by leaf and in blocks, to raw files in a folder
``checkpoint.clients-<round>`` beside ``checkpoint.pt`` (which records the store's shape and the
ids), so a store of any size is checkpointed with bounded memory. The folder is complete and
synced before ``checkpoint.pt`` is atomically replaced to point at it, and older folders are
removed only after that, so a crash at any moment leaves a consistent checkpoint.

Loading never unpickles objects (``torch.load(weights_only=True)``): everything saved is tensors,
dicts, lists, tuples, strings and numbers, so a crafted ``checkpoint.pt`` cannot run code.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from atoll.runtime.store import ClientStore
from atoll.types import ServerState

FILE = "checkpoint.pt"
CLIENTS = "checkpoint.clients-"
BLOCK_BYTES = 64 * 2**20  # rows moved at a time when saving or loading a store


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(run_dir: Path, state: ServerState, client_states) -> None:
    """Checkpoint ``state`` and ``client_states`` (a dict, or a ``ClientStore``)."""
    run_dir = Path(run_dir)
    ck = {"format": 2, "round": state.round, "params": state.params,
          "opt_state": state.opt_state, "extra": state.extra}
    if isinstance(client_states, ClientStore):
        ck["client_store"] = _save_store(run_dir, f"{CLIENTS}{state.round}", client_states)
    else:
        ck["client_states"] = client_states
    buf = io.BytesIO()
    torch.save(ck, buf)
    atomic_write(run_dir / FILE, buf.getvalue())
    keep = ck.get("client_store", {}).get("folder")
    for old in run_dir.glob(f"{CLIENTS}*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load(run_dir: Path, store_path: str | Path | None = None) -> tuple[ServerState, Any]:
    """The checkpointed state and client states: a dict, or a ``ClientStore`` rebuilt from the
    saved rows (in files under ``store_path`` when it is large, as ``ClientStore`` decides)."""
    run_dir = Path(run_dir)
    path = run_dir / FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    ck = load_file(path, "checkpoint")
    missing = [k for k in ("round", "params", "opt_state", "extra") if k not in ck]
    if missing or ("client_store" not in ck and "client_states" not in ck):
        raise ValueError(f"{path} is not an atoll checkpoint (missing {missing or 'client states'})")
    state = ServerState(ck["params"], ck["opt_state"], ck["round"], ck["extra"])
    if "client_store" in ck:
        return state, _load_store(run_dir, ck["client_store"], store_path)
    return state, ck["client_states"]


def load_file(path: Path, what: str = "file") -> dict:
    """A dict saved with ``torch.save``, read without unpickling objects: only tensors and plain
    containers and scalars load (``weights_only``), so a crafted file cannot run code."""
    try:
        out = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {path} cannot be loaded safely: it holds something other than "
                         f"tensors and plain data, or is damaged ({first})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{what} {path} does not hold a dict (got {type(out).__name__})")
    return out


def _blocks(ids: torch.Tensor, row: int):
    step = max(1, BLOCK_BYTES // max(row, 1))
    return [ids[i:i + step] for i in range(0, ids.numel(), step)]


def _save_store(run_dir: Path, folder: str, store: ClientStore) -> dict:
    """Write the written rows of ``store`` to ``run_dir/folder/leaf<i>.bin`` (raw, id order)."""
    final, tmp = run_dir / folder, run_dir / (folder + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ids = store.written_ids()
    files = [open(tmp / f"leaf{i}.bin", "wb") for i in range(len(store.row_bytes()))]
    try:
        for block in _blocks(ids, sum(store.row_bytes())):
            for f, leaf in zip(files, tree_flatten(store.get(block))[0]):
                f.write(memoryview(leaf.contiguous().reshape(-1).view(torch.uint8).numpy()))
        for f in files:
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files:
            f.close()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    return {"folder": folder, "num_clients": store.num_clients, "template": store.template(),
            "ids": ids, "memory_limit_bytes": store.memory_limit_bytes}


def _load_store(run_dir: Path, meta: dict, store_path) -> ClientStore:
    folder = run_dir / meta["folder"]
    store = ClientStore(meta["num_clients"], meta["template"], path=store_path,
                        memory_limit_bytes=meta["memory_limit_bytes"])
    leaves, spec = tree_flatten(meta["template"])
    sizes = store.row_bytes()
    files = [open(folder / f"leaf{i}.bin", "rb") for i in range(len(leaves))]
    try:
        for block in _blocks(meta["ids"], sum(sizes)):
            rows = []
            for f, t, size in zip(files, leaves, sizes):
                out = torch.empty((block.numel(), *t.shape), dtype=t.dtype)
                view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
                if f.readinto(view) != block.numel() * size:
                    raise ValueError(f"checkpoint: {f.name} is shorter than its "
                                     f"{meta['ids'].numel()} client rows")
                rows.append(out)
            store.put(block, tree_unflatten(rows, spec))
    finally:
        for f in files:
            f.close()
    return store


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
