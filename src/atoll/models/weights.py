"""A model file (``RUN_DIR/model.pt``: a state dict of tensors) read back into a model: for
transfer learning (``[model] init``), ``atoll audit`` and the watermark's verification.

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, no
pickled object, so a crafted file cannot run code; it may be at most ``MAX_BYTES`` on disk.
Every entry taken must exist in the file with the model's shape (the error names the entry)."""
from __future__ import annotations

from pathlib import Path

import torch

MAX_BYTES = 2 * 2**30


def load_weights(path: str | Path, model: torch.nn.Module, only: list[str] | None = None) -> dict:
    """``{name: tensor}`` for the model's parameters whose names start with one of ``only``
    (default: all of them), from the file, cast to the model's dtypes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.stat().st_size > MAX_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than a model file may hold "
                         f"({MAX_BYTES})")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 -- any unreadable file gets the same clear error
        raise ValueError(f"{path}: not a model state dict ({exc})") from None
    if not isinstance(state, dict) or any(not isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a model state dict (a dict of tensors)")
    expected = dict(model.named_parameters())
    names = [k for k in expected if only is None or any(k.startswith(p) for p in only)]
    if not names:
        raise ValueError(f"{path}: no parameter of the model starts with {only} (the model has "
                         f"{', '.join(expected)})")
    for k in names:
        if k not in state or tuple(state[k].shape) != tuple(expected[k].shape):
            got = tuple(state[k].shape) if k in state else "missing"
            raise ValueError(f"{path}: entry {k!r} should have shape {tuple(expected[k].shape)}, got {got}")
        if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all()):
            raise ValueError(f"{path}: entry {k!r} holds NaN or infinite values")
    return {k: state[k].to(expected[k].dtype) for k in names}
