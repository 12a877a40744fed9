"""Built-in data sets, FedProx's Synthetic(α, β) and user files (CSV, Parquet, NPZ)."""
import csv

import numpy as np
import pytest
import torch

from atoll import data
from atoll.data.datasets import SYNTHETIC_MAX_DEVICE


@pytest.mark.parametrize("name,n,f,k,counts", [
    ("digits", 1797, 64, 10, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]),
    ("breast_cancer", 569, 30, 2, [212, 357]),
    ("wine", 178, 13, 3, [59, 71, 48]),
])
def test_builtin_shapes_and_class_counts(name, n, f, k, counts):
    ds = data.load(name)
    assert ds.x.shape == (n, f) and ds.x.dtype == torch.float32
    assert ds.y.shape == (n,) and ds.y.dtype == torch.int64
    assert ds.n_classes == k and torch.bincount(ds.y).tolist() == counts
    assert ds.groups is None and len(ds.feature_names) == f
    assert name in data.BUILTIN and str(n) in data.BUILTIN[name]


def test_digits_scaled_to_unit_interval():
    x = data.load("digits").x
    assert x.min() == 0.0 and x.max() == 1.0


def test_mnistlike_is_dense_reproducible_and_learnable_per_class():
    a, b, c = data.load("mnistlike", seed=1), data.load("mnistlike", seed=1), data.load("mnistlike", seed=2)
    assert a.x.shape == (12_000, 784) and a.n_classes == 10 and torch.bincount(a.y).min() > 1_000
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    assert a.x.min() == 0.0 and a.x.max() == 1.0 and (a.x == 0).float().mean() < 0.15  # dense (digits: 49 %)
    means = torch.stack([a.x[a.y == k].mean(0) for k in range(10)])  # the class templates
    nearest = torch.cdist(a.x[:500], means).argmin(1)
    assert (nearest == a.y[:500]).float().mean() > 0.9  # classes are separable


def _device_label_share(ds):
    """Mean over devices of the share of the device's most common label."""
    shares = [torch.bincount(ds.y[ds.groups == g], minlength=10).max().item() / (ds.groups == g).sum().item()
              for g in range(int(ds.groups.max()) + 1)]
    return sum(shares) / len(shares)


def test_synthetic_matches_fedprox_setup():
    ds = data.load("synthetic", seed=0)
    assert ds.x.shape[1] == 60 and ds.n_classes == 10 and ds.y.max() <= 9
    sizes = torch.bincount(ds.groups)
    assert len(sizes) == 30 and sizes.min() >= 50 and sizes.max() <= SYNTHETIC_MAX_DEVICE
    assert sizes.max() / sizes.min() > 5  # power-law device sizes
    assert len(ds.y) == sizes.sum() < 30 * SYNTHETIC_MAX_DEVICE
    assert torch.equal(ds.groups, torch.sort(ds.groups).values)  # devices are contiguous blocks
    assert _device_label_share(ds) > 0.5  # each device's own W_k, v_k skews its labels


def test_synthetic_reproducible_from_seed():
    a, b = data.load("synthetic", seed=3), data.load("synthetic", seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.groups, b.groups)
    c = data.load("synthetic", seed=4)
    assert c.x.shape != a.x.shape or not torch.equal(c.x, a.x)
    small = data.load("synthetic", synthetic_devices=5, synthetic_alpha=0.5, synthetic_beta=0.5)
    assert torch.unique(small.groups).tolist() == [0, 1, 2, 3, 4] and small.name == "synthetic(0.5,0.5)"


def test_synthetic_iid_variant_shares_one_distribution():
    niid = data.load("synthetic", seed=0)
    iid = data.load("synthetic", seed=0, synthetic_iid=True)
    assert torch.equal(torch.bincount(iid.groups), torch.bincount(niid.groups))
    assert len(torch.unique(iid.y)) == 10
    assert abs(iid.x.mean().item()) < 0.05  # x ~ N(0, Σ) on every device
    assert _device_label_share(iid) < 0.4 < _device_label_share(niid)


def test_unknown_name_lists_builtins_and_suggests():
    with pytest.raises(ValueError, match="Did you mean 'digits'") as e:
        data.load("digit")
    assert "breast_cancer" in str(e.value) and "wine" in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        data.load("/nonexistent/file.csv")
    with pytest.raises(ValueError, match="group_column"):
        data.load("wine", group_column="site")


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return str(path)


def test_csv_round_trip_with_string_labels_and_groups(tmp_path):
    rows = [["f1", "f2", "label", "site"], ["1.5", "2", "dog", "b"], ["0", "-1", "cat", "a"],
            ["3", "4.25", "bird", "b"], ["2", "0", "cat", "c"]]
    ds = data.load(_write_csv(tmp_path / "pets.csv", rows), group_column="site")
    assert ds.name == "pets" and ds.feature_names == ("f1", "f2") and ds.n_classes == 3
    assert torch.equal(ds.x, torch.tensor([[1.5, 2], [0, -1], [3, 4.25], [2, 0]]))
    assert ds.y.tolist() == [2, 1, 0, 1]  # bird, cat, dog sorted
    assert ds.groups.tolist() == [1, 0, 1, 2]


def test_csv_numeric_labels_sorted_numerically(tmp_path):
    rows = [["x", "target"], ["0", "10"], ["1", "2"], ["2", "1"], ["3", "2"]]
    ds = data.load(_write_csv(tmp_path / "n.csv", rows), label="target")
    assert ds.y.tolist() == [2, 1, 0, 1] and ds.n_classes == 3 and ds.x.shape == (4, 1)


def test_csv_errors_are_clear(tmp_path):
    good = [["a", "b", "y"], ["1", "2", "0"], ["3", "4", "1"]]
    path = _write_csv(tmp_path / "d.csv", good)
    with pytest.raises(ValueError, match="no column 'target'") as e:
        data.load(path, label="target")
    assert "['a', 'b', 'y']" in str(e.value) and "d.csv" in str(e.value)
    nan = _write_csv(tmp_path / "nan.csv", [["a", "b", "label"], ["1", "", "0"], ["2", "nan", "1"]])
    with pytest.raises(ValueError, match="column 'b' has 2 missing values"):
        data.load(nan)
    text = _write_csv(tmp_path / "t.csv", [["a", "color", "label"], ["1", "red", "0"]])
    with pytest.raises(ValueError, match="feature column 'color' is not numeric"):
        data.load(text)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.load(str(tmp_path / "empty.csv"))
    header = _write_csv(tmp_path / "h.csv", [["a", "label"]])
    with pytest.raises(ValueError, match="no data rows"):
        data.load(header)
    (tmp_path / "x.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        data.load(str(tmp_path / "x.txt"))


def test_parquet_round_trip_and_nulls(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"age": [30, 41, 52], "bmi": [22.5, 31.0, 27.25], "label": [1, 0, 1],
                      "hospital": ["north", "south", "north"]})
    pq.write_table(table, tmp_path / "h.parquet")
    ds = data.load(str(tmp_path / "h.parquet"), group_column="hospital")
    assert ds.feature_names == ("age", "bmi") and ds.n_classes == 2
    assert torch.equal(ds.x, torch.tensor([[30, 22.5], [41, 31.0], [52, 27.25]]))
    assert ds.y.tolist() == [1, 0, 1] and ds.groups.tolist() == [0, 1, 0]
    pq.write_table(pa.table({"age": [1.0, None], "label": [0, 1]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match="column 'age' has 1 missing values"):
        data.load(str(tmp_path / "n.parquet"))


def test_npz_round_trip(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(4, 2, 3)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([7, 3, 7, 5]), groups=np.array([2, 2, 9, 9]))
    ds = data.load(str(tmp_path / "a.npz"))
    assert ds.x.shape == (4, 6) and torch.equal(ds.x[1], torch.arange(6.0, 12.0))
    assert ds.y.tolist() == [2, 0, 2, 1] and ds.n_classes == 3 and ds.groups.tolist() == [0, 0, 1, 1]
    np.savez(tmp_path / "b.npz", x=x)
    with pytest.raises(ValueError, match="arrays present: \\['x'\\]"):
        data.load(str(tmp_path / "b.npz"))
