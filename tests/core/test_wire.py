import pytest
import torch

from atoll.transport import wire


@pytest.mark.parametrize("dtype", wire.DTYPES, ids=str)
def test_round_trip_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * 50
    t = (base > 0) if dtype == torch.bool else base.abs().to(dtype) if dtype.is_complex is False else base.to(dtype)
    tree = {"layer.0/weight": t, "scalar": t.reshape(-1)[0].clone(), "empty": torch.empty(0, 7, dtype=dtype)}
    back = wire.loads(wire.dumps(tree))
    assert list(back) == list(tree)
    for k in tree:
        assert back[k].dtype == dtype and back[k].shape == tree[k].shape
        assert torch.equal(back[k], tree[k])


def test_size_is_header_plus_raw_bytes():
    t = torch.zeros(1000, dtype=torch.float32)
    n = len(wire.dumps({"w": t}))
    header = 3 + 1 + 4 + 2 + 1 + 1 + 1 + 4
    assert n == header + 4000


def test_non_contiguous_and_bfloat16_values():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(wire.loads(wire.dumps({"t": t}))["t"], t)
    b = torch.tensor([1.5, -2.25, 3e30], dtype=torch.bfloat16)
    assert torch.equal(wire.loads(wire.dumps({"b": b}))["b"], b)


@pytest.mark.parametrize("mutate, msg", [
    (lambda b: b"XYZ" + b[3:], "magic"),
    (lambda b: b[:3] + bytes([9]) + b[4:], "version"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\x00", "trailing"),
    (lambda b: b[:10], "truncated"),
])
def test_malformed_messages_are_named(mutate, msg):
    good = wire.dumps({"w": torch.ones(4)})
    with pytest.raises(wire.WireError, match=msg):
        wire.loads(mutate(good))


def test_size_limit():
    data = wire.dumps({"w": torch.ones(100)})
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.loads(data, max_bytes=100)
