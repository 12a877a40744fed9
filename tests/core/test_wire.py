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


def _tree(i=1.0):
    """Mixed dtypes and shapes, so that some entries are not aligned to their dtype in a row."""
    return {"delta/w": torch.arange(12, dtype=torch.float32).reshape(3, 4) * i,
            "aux/flag": torch.tensor([True, False, i > 1]),
            "delta/b": torch.linspace(-1, 1, 5, dtype=torch.float64) * i,
            "delta/s": torch.tensor(2.5 * i, dtype=torch.float32),
            "delta/e": torch.empty(0, 3, dtype=torch.float16)}


@pytest.mark.parametrize("n", [0, 1, 5])
def test_layout_rows_are_dumps_bytes_and_stack_back(n):
    trees = [_tree(i + 1.0) for i in range(n)]
    layout = wire.Layout.of(_tree())
    rows = layout.rows(n)
    assert rows.views["delta/w"] is not None and rows.views["delta/b"] is None  # offset 8k+4
    for name in layout.entries:
        rows.fill(name, torch.stack([t[name] for t in trees]) if n else _tree()[name][None][:0])
    assert [bytes(m) for m in rows.messages] == [wire.dumps(t) for t in trees]
    assert all(len(m) == layout.size and layout.matches(m) for m in rows.messages)
    for messages in (rows.messages, [bytes(m) for m in rows.messages], rows.messages[::-1]):
        stacked = layout.stack(messages)
        for i, m in enumerate(messages):
            for name, v in wire.loads(m).items():
                assert stacked[name][i].dtype == v.dtype and torch.equal(stacked[name][i], v)


def test_stack_reads_rows_in_place_and_copies_otherwise():
    layout = wire.Layout.of({"w": torch.zeros(4, 4)})
    rows = layout.rows(3)
    rows.views["w"].copy_(torch.randn(3, 4, 4))
    assert layout.stack(rows.messages)["w"].data_ptr() == rows.views["w"].data_ptr()
    copied = layout.stack(rows.messages[::-1])["w"]
    assert copied.data_ptr() != rows.views["w"].data_ptr()
    assert torch.equal(copied, rows.views["w"].flip(0))
    # a buffer given for the copies is used when large enough
    buf = torch.empty(10 * layout.stride, dtype=torch.uint8)
    got = layout.stack([bytes(m) for m in rows.messages], buf)["w"]
    assert buf.data_ptr() <= got.data_ptr() < buf.data_ptr() + buf.numel()


def test_layout_matches_exactly_what_loads_decodes_to_it():
    layout = wire.Layout.of(_tree())
    good = wire.dumps(_tree(3.0))
    assert layout.matches(good) and layout == wire.Layout.parse(good)
    other = dict(_tree())
    other["delta/w"] = other["delta/w"].reshape(4, 3)
    for bad in (good[:-1], good + b"\0", wire.dumps(other), wire.dumps({"delta/w": _tree()["delta/w"]}),
                good.replace(b"delta/w", b"delta/v")):
        assert not layout.matches(bad)
    with pytest.raises(wire.WireError, match="message 1"):
        layout.stack([good, good[:-1]])
    with pytest.raises(wire.WireError, match="entry 'delta/w'"):
        layout.rows(2).fill("delta/w", torch.zeros(2, 3, 4, dtype=torch.float64))
