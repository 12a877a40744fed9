"""A :class:`Dataset` spread over clients: local train/test splits plus a central test set.

Two layouts (see :func:`layout`):

* natural silos (``partition="column"``): clients are the data's groups; each client's data is
  split into train and a local test split, and the central test set is the union of the local
  test splits, as in FedProx (Li et al. 2020, sec. 5.1);
* simulated clients (any other partition): a stratified central test set is held out first,
  the rest is partitioned (``atoll.data.partition``) and each share split into train/test.

Invariants: every sample is in exactly one of {some client's train, some client's test, the
central test set} (for "column", central = union of the clients' tests); each non-empty client
keeps at least one training sample; standardisation statistics come from the union of the
clients' training splits only. All draws use ``atoll.rng.key(seed, 0, ., purpose)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atoll import rng
from atoll.data.datasets import Dataset
from atoll.data.partition import partition as split_clients


@dataclass(frozen=True)
class ClientData:
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n(self) -> int:
        """Number of training samples."""
        return int(self.y.shape[0])


@dataclass(frozen=True)
class FederatedData:
    name: str
    clients: list[ClientData]
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_features: int
    n_classes: int
    # the standardisation applied, x = (raw - x_mean) / x_std; None where features are raw
    x_mean: torch.Tensor | None = None
    x_std: torch.Tensor | None = None


@dataclass(frozen=True)
class Layout:
    """Sample indices into the Dataset: per-client train and test, and the central test set."""
    train: list[np.ndarray]
    test: list[np.ndarray]
    central: np.ndarray


def build(ds: Dataset, *, num_clients: int | None, partition: str = "iid", seed: int = 0,
          test_fraction: float = 0.2, client_test_fraction: float = 0.2, standardize: bool = True,
          dtype: torch.dtype = torch.float32, **partition_opts) -> FederatedData:
    """Split ``ds`` over clients (see :func:`layout`) and z-score features with train statistics."""
    lay = layout(ds, num_clients=num_clients, partition=partition, seed=seed,
                 test_fraction=test_fraction, client_test_fraction=client_test_fraction,
                 **partition_opts)
    x, mean, std = ds.x.to(torch.float64), None, None
    if standardize:
        mean, std = train_stats(x, lay.train)
        x = (x - mean) / std
    x = x.to(dtype)

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(idx.astype(np.int64))
        return x[t], ds.y[t]

    # the clients' training samples are consecutive rows of one tensor (views), so that a
    # runtime gathers a chunk's batches from it with one index (``runtime.work.pooled``)
    sizes = [len(tr) for tr in lay.train]
    xs, ys = take(np.concatenate(lay.train) if lay.train else np.zeros(0, np.int64))
    clients = [ClientData(x_, y_, *take(te))
               for x_, y_, te in zip(xs.split(sizes), ys.split(sizes), lay.test)]
    return FederatedData(ds.name, clients, *take(lay.central), int(ds.x.shape[1]), ds.n_classes, mean, std)


def layout(ds: Dataset, *, num_clients: int | None, partition: str = "iid", seed: int = 0,
           test_fraction: float = 0.2, client_test_fraction: float = 0.2,
           **partition_opts) -> Layout:
    """Which samples each client trains and tests on, and the central test set (no tensors)."""
    if not 0.0 <= client_test_fraction < 1.0:
        raise ValueError(f"data.client_test_fraction must be in [0, 1), got {client_test_fraction}")
    y = ds.y.numpy()
    gen = np.random.default_rng(rng.key(seed, 0, rng.SERVER, "partition"))
    if partition == "column":
        if ds.groups is None:
            raise ValueError(f"partition 'column' needs natural silos, and {ds.name!r} has none: set "
                             "data.group_column (CSV/Parquet) or use data set 'synthetic'")
        if client_test_fraction <= 0:
            raise ValueError("partition 'column' builds the central test set from the clients' local "
                             "test splits; data.client_test_fraction must be > 0")
        shares = split_clients(y, num_clients, "column", gen, groups=ds.groups.numpy())
        train, test = _local_splits(shares, client_test_fraction, seed)
        return Layout(train, test, np.sort(np.concatenate(test)))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    hold = np.random.default_rng(rng.key(seed, 0, rng.SERVER, "central-test"))
    central, rest = stratified_holdout(y, test_fraction, hold)
    shares = [rest[p] for p in split_clients(y[rest], num_clients, partition, gen, **partition_opts)]
    train, test = _local_splits(shares, client_test_fraction, seed)
    return Layout(train, test, central)


def stratified_holdout(y: np.ndarray, fraction: float,
                       gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(held, rest)``: round(fraction * n_c) random samples of each class c are held out,
    but never a class's last sample. Both index arrays are sorted."""
    held = []
    for c in np.unique(y):
        idx = gen.permutation(np.flatnonzero(y == c))
        held.append(idx[:min(int(round(fraction * len(idx))), len(idx) - 1)])
    held = np.sort(np.concatenate(held)).astype(np.int64)
    if len(held) == 0:
        raise ValueError(f"the central test set would be empty ({len(y)} samples, test_fraction "
                         f"{fraction}); raise data.test_fraction or use more data")
    return held, np.setdiff1d(np.arange(len(y)), held)


def train_stats(x: torch.Tensor, train: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (population) of the clients' training rows; a std below 1e-12
    (a constant feature) is replaced by 1 so the feature maps to 0 instead of NaN."""
    rows = x[torch.from_numpy(np.concatenate(train).astype(np.int64))]
    mean, std = rows.mean(0), rows.std(0, correction=0)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def _local_splits(shares: list[np.ndarray], fraction: float,
                  seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split client c's share at random (key ``(seed, 0, c, "client-split")``) into train and
    round(fraction * n) test samples, keeping at least one sample for training."""
    train, test = [], []
    for cid, idx in enumerate(shares):
        perm = np.random.default_rng(rng.key(seed, 0, cid, "client-split")).permutation(idx)
        k = min(int(round(fraction * len(idx))), max(len(idx) - 1, 0))
        test.append(np.sort(perm[:k]).astype(np.int64))
        train.append(np.sort(perm[k:]).astype(np.int64))
    return train, test
