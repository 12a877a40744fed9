"""Data sets as flat tensors: scikit-learn's bundled sets, FedProx's Synthetic(α, β), user files.

Invariants of every :class:`Dataset`: ``x`` is float32 ``(N, F)``, ``y`` is int64 ``(N,)`` with
values in ``0..n_classes-1`` (labels are encoded by sorting their distinct values), and
``groups``, when present, is int64 ``(N,)`` with values ``0..G-1`` (the natural silo of each
sample). Nothing is downloaded: built-ins come from scikit-learn's bundled files or are
generated from ``atoll.rng.key(seed, 0, SERVER, "synthetic")``.
"""
from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atoll import rng
from atoll.parse_lock import PARSE


@dataclass(frozen=True)
class Dataset:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    n_classes: int
    groups: torch.Tensor | None = None
    feature_names: tuple[str, ...] = ()


BUILTIN: dict[str, str] = {
    "digits": "8x8 handwritten digits (scikit-learn): 1797 samples, 64 features in [0, 1], 10 classes",
    "breast_cancer": "Wisconsin diagnostic breast cancer: 569 samples, 30 features, 2 classes",
    "wine": "wine cultivars: 178 samples, 13 features, 3 classes",
    "mnistlike": "MNIST-shaped, generated: 12,000 samples of 28x28 = 784 features in [0, 1] (smooth "
                 "class templates plus noise, dense like natural images), 10 classes",
    "synthetic": "Synthetic(alpha, beta) of FedProx (Li et al. 2020): 30 devices of power-law sizes "
                 "(at most 19,500 samples), 60 features, 10 classes; devices are natural silos "
                 "(partition = \"column\")",
}
SYNTHETIC_FEATURES, SYNTHETIC_CLASSES = 60, 10
SYNTHETIC_MAX_DEVICE = 650  # cap on one device's size: 30 devices stay below 19,500 samples
_FILES = (".csv", ".parquet", ".npz")
_NA = frozenset({"", "na", "nan", "null", "none"})


def load(name_or_path: str, *, seed: int = 0, label: str = "label", group_column: str | None = None,
         synthetic_alpha: float = 1.0, synthetic_beta: float = 1.0, synthetic_devices: int = 30,
         synthetic_iid: bool = False) -> Dataset:
    """A built-in data set by name, or a ``.csv`` / ``.parquet`` / ``.npz`` file by path."""
    path = Path(name_or_path)
    if path.suffix.lower() in _FILES:
        return _load_file(path, label, group_column)
    if group_column is not None:
        raise ValueError(f"data.group_column applies to CSV/Parquet files, not to {name_or_path!r}")
    if name_or_path == "synthetic":
        return synthetic(synthetic_devices, synthetic_alpha, synthetic_beta, iid=synthetic_iid, seed=seed)
    if name_or_path == "mnistlike":
        return mnistlike(seed=seed)
    if name_or_path in BUILTIN:
        return _sklearn(name_or_path)
    if path.is_file():
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .parquet or .npz")
    close = difflib.get_close_matches(name_or_path, list(BUILTIN), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown data set {name_or_path!r}; built-ins are {', '.join(BUILTIN)}, or give a "
                     f"path to a .csv, .parquet or .npz file.{hint}")


def _sklearn(name: str) -> Dataset:
    from sklearn import datasets as skd

    bunch = {"digits": skd.load_digits, "breast_cancer": skd.load_breast_cancer,
             "wine": skd.load_wine}[name]()
    x = bunch.data / 16.0 if name == "digits" else bunch.data  # digits pixels are 0..16
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return Dataset(name, torch.as_tensor(x, dtype=torch.float32), y, int(y.max()) + 1,
                   feature_names=tuple(str(f) for f in getattr(bunch, "feature_names", ())))


def mnistlike(n: int = 12_000, seed: int = 0) -> Dataset:
    """MNIST-shaped (784 features in [0, 1], 10 classes): smooth class templates plus noise. The
    robustness benchmark's second task, and a dense image set for the leakage audit's PSNR."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    templates = torch.nn.functional.avg_pool2d(torch.rand(10, 1, 28, 28, generator=g), 5, 1, 2).reshape(10, 784)
    x = (templates[y] + 0.35 * torch.randn(n, 784, generator=g)).clamp(0, 1)
    return Dataset("mnistlike", x, y, 10)


# --- Synthetic(α, β), Li et al. 2020, "Federated Optimization in Heterogeneous Networks" ------

def synthetic(devices: int = 30, alpha: float = 1.0, beta: float = 1.0, *, iid: bool = False,
              seed: int = 0) -> Dataset:
    """Synthetic(α, β) of FedProx (sec. 5.1 and appendix C.1), ``groups`` = device index.

    Device k: u_k ~ N(0, α), W_k ~ N(u_k, 1) (10x60), b_k ~ N(u_k, 1); B_k ~ N(0, β),
    v_k[j] ~ N(B_k, 1); x ~ N(v_k, Σ) with Σ = diag(j^-1.2); y = argmax(W_k x + b_k) (the argmax
    of the softmax). As in the paper's generator, α and β are passed to ``normal`` as scales.
    IID variant: one W, b ~ N(0, 1) shared by all devices and x ~ N(0, Σ), i.e. v = 0 as in the
    paper's ``generate_iid.py`` (a shared random v ~ N(0, 1) would dominate W x and give nearly
    a single label: v·W_c has variance 60 against about 3.4 for the x-noise). Device sizes follow
    the generator's power law, n_k = int(lognormal(4, 2)) + 50, capped at 650 here so 30 devices
    stay below 19,500 samples.
    """
    if devices < 1:
        raise ValueError(f"data.synthetic_devices must be >= 1, got {devices}")
    g = np.random.default_rng(rng.key(seed, 0, rng.SERVER, "synthetic"))
    f, c = SYNTHETIC_FEATURES, SYNTHETIC_CLASSES
    sizes = np.minimum(g.lognormal(4, 2, devices).astype(np.int64) + 50, SYNTHETIC_MAX_DEVICE)
    sd = np.arange(1, f + 1) ** -0.6  # sqrt of Σ_jj = j^-1.2
    u, big_b = g.normal(0, alpha, devices), g.normal(0, beta, devices)
    shared = (g.normal(0, 1, (c, f)), g.normal(0, 1, c), np.zeros(f))
    xs, ys = [], []
    for k, n in enumerate(sizes):
        w, b, v = shared if iid else (g.normal(u[k], 1, (c, f)), g.normal(u[k], 1, c),
                                      g.normal(big_b[k], 1, f))
        x = v + sd * g.standard_normal((n, f))
        xs.append(x)
        ys.append(np.argmax(x @ w.T + b, axis=1))
    groups = np.repeat(np.arange(devices), sizes)
    name = "synthetic(iid)" if iid else f"synthetic({alpha:g},{beta:g})"
    return Dataset(name, torch.as_tensor(np.concatenate(xs), dtype=torch.float32),
                   torch.as_tensor(np.concatenate(ys), dtype=torch.int64), c,
                   torch.as_tensor(groups, dtype=torch.int64),
                   tuple(f"x{j}" for j in range(f)))


# --- user files ---------------------------------------------------------------------------

def _load_file(path: Path, label: str, group_column: str | None) -> Dataset:
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    if path.suffix.lower() == ".npz":
        return _from_npz(path)
    columns = _read_csv(path) if path.suffix.lower() == ".csv" else _read_parquet(path)
    return _from_columns(path, columns, label, group_column)


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of strings; the first row is the header."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [[c.strip() for c in r] for r in csv.reader(fh) if r]
    if not rows:
        raise ValueError(f"{path}: the file is empty")
    header, body = rows[0], rows[1:]
    if not body:
        raise ValueError(f"{path}: has a header but no data rows")
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ValueError(f"{path}: data row {i + 1} has {len(r)} cells, the header {len(header)}")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: duplicate column names in the header {header}")
    cells = np.array(body, dtype=object)
    return {h: cells[:, j] for j, h in enumerate(header)}


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'atoll[parquet]')") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    if table.num_rows == 0:
        raise ValueError(f"{path}: the file has no rows")
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}


def _from_columns(path: Path, cols: dict[str, np.ndarray], label: str, group: str | None) -> Dataset:
    """Target ``label``, optional silo column ``group``; every other column is a numeric feature."""
    for role, name in (("data.label", label), ("data.group_column", group)):
        if name is not None and name not in cols:
            raise ValueError(f"{path}: no column {name!r} ({role}); columns present: {list(cols)}")
    for name, col in cols.items():
        miss = _missing(col)
        if miss.any():
            raise ValueError(f"{path}: column {name!r} has {int(miss.sum())} missing values "
                             f"(first in data row {int(np.argmax(miss)) + 1})")
    features = [n for n in cols if n not in (label, group)]
    if not features:
        raise ValueError(f"{path}: no feature columns besides {label!r}")
    x = np.stack([_numeric(path, n, cols[n]) for n in features], axis=1)
    y, classes = _encode(cols[label])
    groups = torch.as_tensor(_encode(cols[group])[0]) if group is not None else None
    return Dataset(path.stem, torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y),
                   len(classes), groups, tuple(features))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive (no pickles) that has arrays ``x`` and ``y``, or a
    ValueError naming the file."""
    try:
        with PARSE, np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # a corrupt archive raises zipfile / OSError / ValueError
        raise ValueError(f"{path}: not a readable .npz archive ({e})") from e
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(f"{path}: needs arrays 'x' and 'y'; arrays present: {list(arrays)}")
    return arrays


def _from_npz(path: Path) -> Dataset:
    """Arrays ``x`` (N, ...) flattened to (N, F), ``y`` (N,), optional ``groups`` (N,)."""
    arrays = read_npz(path)
    x, y, g = arrays["x"], arrays["y"], arrays.get("groups")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or (g is not None and g.shape != y.shape):
        raise ValueError(f"{path}: need x (N, F), y (N,) and groups (N,); got x {x.shape}, "
                         f"y {y.shape}" + (f", groups {g.shape}" if g is not None else ""))
    if len(y) == 0:
        raise ValueError(f"{path}: the arrays are empty")
    x = _numeric(path, "x", x.reshape(len(x), -1))
    yc, classes = _encode(y)
    groups = torch.as_tensor(_encode(g)[0]) if g is not None else None
    return Dataset(path.stem, torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(yc),
                   len(classes), groups)


def _missing(col: np.ndarray) -> np.ndarray:
    if col.dtype.kind == "f":
        return np.isnan(col)
    if col.dtype.kind != "O":
        return np.zeros(col.shape, dtype=bool)
    return np.array([v is None or (isinstance(v, float) and v != v)
                     or (isinstance(v, str) and v.lower() in _NA) for v in col], dtype=bool)


def _numeric(path: Path, name: str, col: np.ndarray) -> np.ndarray:
    """``col`` as float64, or a ValueError naming the column and its first non-number."""
    try:
        out = col.astype(np.float64)
    except (ValueError, TypeError):
        bad = next(i for i, v in enumerate(col.reshape(-1)) if not _is_number(v))
        raise ValueError(f"{path}: feature column {name!r} is not numeric (value "
                         f"{col.reshape(-1)[bad]!r}); columns other than data.label and "
                         f"data.group_column must be numbers") from None
    bad = ~np.isfinite(out)
    if bad.any():
        raise ValueError(f"{path}: column {name!r} has {int(bad.sum())} missing or infinite values")
    return out


def _is_number(v) -> bool:
    try:
        float(v)
    except (ValueError, TypeError):
        return False
    return True


def _encode(col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes 0..K-1 of the sorted distinct values (numerically if all values are numbers)."""
    if col.dtype.kind == "O":
        try:
            col = col.astype(np.float64)
        except (ValueError, TypeError):
            col = col.astype(str)
    classes, codes = np.unique(col, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), classes
