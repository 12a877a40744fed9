"""Client partitions and the federated layout (central test set, local splits, standardisation)."""
import numpy as np
import pytest
import torch

from atoll import data, rng
from atoll.data import partition as P_fn
from atoll.data.federated import layout
from atoll.data.partition import by_group, dirichlet, iid, quantity_skew, shards

Y = data.load("digits").y.numpy()  # 1797 labels, 10 classes


def gen(seed=0):
    return np.random.default_rng(rng.key(seed, 0, rng.SERVER, "partition"))


def assert_partition(parts, n):
    """Disjoint, covering range(n), each client sorted int64."""
    flat = np.concatenate(parts)
    assert flat.dtype == np.int64 and len(flat) == n
    assert np.array_equal(np.sort(flat), np.arange(n))
    assert all(np.all(np.diff(p) > 0) for p in parts)


def max_label_share(parts, y):
    return float(np.mean([np.bincount(y[p]).max() / len(p) for p in parts]))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards", "quantity"])
def test_partitions_disjoint_covering_reproducible(method):
    a = P_fn(Y, 10, method, gen(0))
    assert len(a) == 10 and all(len(p) >= 1 for p in a)
    assert_partition(a, len(Y))
    b, c = P_fn(Y, 10, method, gen(0)), P_fn(Y, 10, method, gen(1))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_iid_balanced_and_dirichlet_skewed():
    parts = iid(len(Y), 10, gen())
    assert {len(p) for p in parts} <= {179, 180} and max_label_share(parts, Y) < 0.2
    # Dir(0.1) over 10 clients: a client's top label holds ~0.58 of its data on average over
    # seeds (0.46..0.69 over 20 seeds), against 1/10 + noise for IID
    skew = [max_label_share(dirichlet(Y, 10, 0.1, gen(s)), Y) for s in range(5)]
    assert min(skew) > 0.4 and np.mean(skew) > 0.5
    assert max_label_share(dirichlet(Y, 10, 100.0, gen()), Y) < 0.2  # large alpha ~ IID


def test_dirichlet_min_size_by_moving_samples():
    # one draw with alpha = 0.01 over 60 clients leaves clients empty; the fix-up fills them
    parts = dirichlet(Y, 60, 0.01, gen(), min_size=5, max_draws=1)
    assert_partition(parts, len(Y))
    assert min(len(p) for p in parts) == 5
    with pytest.raises(ValueError, match="cannot give 10 clients 200 samples"):
        dirichlet(Y, 10, 0.5, gen(), min_size=200)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_at_most_k_labels(k):
    parts = shards(Y, 10, k, gen())
    assert_partition(parts, len(Y))
    assert max(len(np.unique(Y[p])) for p in parts) <= k
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= k * 20  # shards of near-equal size (~1797 / (10 k))


def test_shards_with_tiny_class_and_too_few_shards():
    y = np.array([0] + [1] * 99)
    parts = shards(y, 50, 2, gen())  # 100 one-sample shards
    assert_partition(parts, 100)
    assert all(len(p) == 2 for p in parts)
    with pytest.raises(ValueError, match="need between 10"):
        shards(Y, 4, 2, gen())


def test_quantity_skew_sizes():
    parts = quantity_skew(1000, 20, gen(), sigma=2.0)
    assert_partition(parts, 1000)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 1 and max(sizes) / min(sizes) > 10


def test_by_group_sorted_values():
    parts = by_group(np.array([5, 3, 5, 9, 3]))
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]


def test_partition_argument_errors():
    with pytest.raises(ValueError, match="data.group_column"):
        P_fn(Y, 3, "column", gen())
    with pytest.raises(ValueError, match="data.num_clients = 2"):
        P_fn(np.zeros(4), 3, "column", gen(), groups=np.array([0, 0, 1, 1]))
    assert len(P_fn(np.zeros(4), 0, "column", gen(), groups=np.array([0, 0, 1, 1]))) == 2
    with pytest.raises(ValueError, match="exceeds the 5 samples"):
        P_fn(np.zeros(5), 6, "iid", gen())
    with pytest.raises(ValueError, match="data.alpha"):
        P_fn(Y, 3, "dirichlet", gen(), alpha=0.0)
    with pytest.raises(ValueError, match="data.sigma"):
        P_fn(Y, 3, "quantity", gen(), sigma=-1.0)
    with pytest.raises(ValueError, match="unknown data.partition 'random'"):
        P_fn(Y, 3, "random", gen())


# --- federated layout -----------------------------------------------------------------------

def test_layout_every_sample_once_and_stratified_central():
    ds = data.load("digits")
    lay = layout(ds, num_clients=10, partition="dirichlet", alpha=0.3, seed=0)
    assert_partition(lay.train + lay.test + [lay.central], len(Y))
    share = np.bincount(Y[lay.central]) / len(lay.central)
    assert np.abs(share - np.bincount(Y) / len(Y)).max() < 0.01
    assert abs(len(lay.central) - 0.2 * len(Y)) <= 10
    for tr, te in zip(lay.train, lay.test):
        assert abs(len(te) - 0.2 * (len(tr) + len(te))) <= 0.5 and len(tr) >= 1


def test_build_shapes_dtype_and_reproducibility():
    ds = data.load("wine")
    fed = data.build(ds, num_clients=4, partition="iid", seed=1, dtype=torch.float64)
    assert fed.n_features == 13 and fed.n_classes == 3 and len(fed.clients) == 4
    assert fed.x_test.dtype == torch.float64 and fed.x_test.shape == (36, 13)
    assert sum(c.n + len(c.y_test) for c in fed.clients) + len(fed.y_test) == 178
    again = data.build(ds, num_clients=4, partition="iid", seed=1, dtype=torch.float64)
    other = data.build(ds, num_clients=4, partition="iid", seed=2, dtype=torch.float64)
    assert all(torch.equal(a.x, b.x) for a, b in zip(fed.clients, again.clients))
    assert not torch.equal(fed.clients[0].x, other.clients[0].x)


def test_standardisation_uses_training_rows_only():
    ds = data.load("breast_cancer")
    kw = dict(num_clients=5, partition="dirichlet", alpha=0.5, seed=0)
    fed = data.build(ds, **kw)
    train = torch.cat([c.x for c in fed.clients]).double()
    assert train.mean(0).abs().max() < 1e-5 and (train.std(0, correction=0) - 1).abs().max() < 1e-4
    lay = layout(ds, **kw)
    test_rows = torch.from_numpy(np.concatenate(lay.test + [lay.central]))
    x2 = ds.x.clone()
    x2[test_rows] = x2[test_rows] * 100 + 7
    fed2 = data.build(data.Dataset(ds.name, x2, ds.y, ds.n_classes), **kw)
    assert all(torch.equal(a.x, b.x) for a, b in zip(fed.clients, fed2.clients))
    assert not torch.equal(fed.x_test, fed2.x_test)
    raw = data.build(ds, standardize=False, **kw)
    assert torch.equal(raw.clients[0].x, ds.x[torch.from_numpy(lay.train[0])])


def test_column_partition_natural_silos():
    ds = data.load("synthetic", seed=0)
    fed = data.build(ds, num_clients=30, partition="column", seed=0)
    assert len(fed.clients) == 30 and fed.n_features == 60 and fed.n_classes == 10
    assert torch.equal(fed.x_test, torch.cat([c.x_test for c in fed.clients]))  # union of local tests
    sizes = torch.bincount(ds.groups)
    assert [c.n + len(c.y_test) for c in fed.clients] == sizes.tolist()
    assert len(data.build(ds, num_clients=0, partition="column").clients) == 30
    with pytest.raises(ValueError, match="data.num_clients = 30"):
        data.build(ds, num_clients=10, partition="column")
    with pytest.raises(ValueError, match="natural silos"):
        data.build(data.load("wine"), num_clients=3, partition="column")


def test_one_sample_client_trains_and_has_empty_test():
    x = torch.arange(12.0).reshape(6, 2)
    ds = data.Dataset("tiny", x, torch.tensor([0, 1, 0, 1, 0, 1]), 2, torch.tensor([0, 0, 0, 0, 0, 1]))
    fed = data.build(ds, num_clients=0, partition="column", client_test_fraction=0.2)
    one = fed.clients[1]
    assert one.n == 1 and one.x_test.shape == (0, 2) and one.y_test.shape == (0,)
    assert fed.clients[0].n == 4 and len(fed.y_test) == 1
