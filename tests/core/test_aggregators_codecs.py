import numpy as np
import pytest
import torch

from atoll import codecs, tree as T
from atoll.aggregators import mean
from atoll.transport import wire


def test_weighted_mean_matches_numpy():
    g = torch.Generator().manual_seed(1)
    stacked = {"w": torch.randn(5, 3, 4, generator=g, dtype=torch.float64),
               "b": torch.randn(5, 4, generator=g, dtype=torch.float64)}
    n = torch.tensor([3.0, 10.0, 1.0, 7.0, 2.0], dtype=torch.float64)
    agg = mean()
    out, _ = agg.aggregate(stacked, agg.weights([0, 1, 2, 3, 4], n), ())
    for k in stacked:
        expect = np.average(stacked[k].numpy(), axis=0, weights=n.numpy())
        np.testing.assert_allclose(out[k].numpy(), expect, rtol=0, atol=1e-14)


def test_uniform_and_custom_weighting():
    stacked = {"w": torch.tensor([[1.0], [3.0]], dtype=torch.float64)}
    n = torch.tensor([1.0, 3.0], dtype=torch.float64)
    u = mean("uniform")
    assert float(u.aggregate(stacked, u.weights([0, 1], n), ())[0]["w"]) == 2.0
    c = mean({4: 1.0, 9: 0.0})
    assert float(c.aggregate(stacked, c.weights([4, 9], n), ())[0]["w"]) == 1.0
    with pytest.raises(ValueError, match="sum to zero"):
        c.aggregate(stacked, torch.zeros(2, dtype=torch.float64), ())
    with pytest.raises(ValueError, match="weighting"):
        mean("by-magic")


def _conformance(codec, tree):
    """Every codec: decode(encode(x)) through real wire bytes has x's keys, shapes, dtypes."""
    state = codec.init(tree)
    payload, state = codec.encode(tree, state, 123)
    back = codec.decode(wire.loads(wire.dumps(payload)))
    assert set(back) == set(tree)
    for k in tree:
        assert back[k].shape == tree[k].shape and back[k].dtype == tree[k].dtype
    return back


def test_identity_and_chain_conformance():
    tree = {"a/w": torch.randn(3, 2), "b": torch.randn(4)}
    for codec in (codecs.identity(), codecs.chain(), codecs.chain(codecs.identity(), codecs.identity())):
        back = _conformance(codec, tree)
        assert all(torch.equal(back[k], tree[k]) for k in tree)
        assert codec.linear and codec.unbiased and codec.event is None


def test_chain_decodes_in_reverse_order():
    def shift(name, by):
        return codecs.Codec(name, init=lambda t: (),
                            encode=lambda t, s, k: ({n: v * 2 + by for n, v in t.items()}, s),
                            decode=lambda p: {n: (v - by) / 2 for n, v in p.items()}, linear=False)
    c = codecs.chain(shift("a", 1.0), shift("b", 5.0))
    tree = {"x": torch.tensor([1.0, 2.0])}
    payload, _ = c.encode(tree, c.init(tree), 0)
    assert torch.equal(payload["x"], (tree["x"] * 2 + 1) * 2 + 5)
    assert torch.equal(c.decode(payload)["x"], tree["x"])
    assert not c.linear and c.name == "a+b"


def test_tree_join_split_round_trip():
    nested = {"params": {"0.weight": torch.ones(2), "0.bias": torch.zeros(1)}, "extra": {"v/x": torch.ones(1)}}
    back = T.split(T.join(nested))
    assert back.keys() == nested.keys() and back["extra"].keys() == {"v/x"}
