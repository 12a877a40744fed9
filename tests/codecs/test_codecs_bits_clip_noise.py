"""Bit packing against a slow reference; clip and noise codecs: conformance and statistics."""
import math

import pytest
import torch

from atoll import codecs, rng
from atoll.codecs import bits
from atoll.privacy import events
from atoll.transport import wire


def _reference_pack(values, b):
    """Bit by bit, LSB first, in plain Python."""
    stream = [(v >> j) & 1 for v in values for j in range(b)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("b", [1, 2, 3, 5, 7, 8, 9, 13, 17, 31])
def test_pack_matches_reference_and_unpack_inverts(b):
    g = torch.Generator().manual_seed(b)
    for n in (0, 1, 7, 33):
        v = torch.randint(0, 2 ** b, (n,), generator=g, dtype=torch.int64)
        packed = bits.pack(v, b)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * b / 8)
        assert packed.numpy().tobytes() == _reference_pack(v.tolist(), b)
        assert torch.equal(bits.unpack(packed, b, n), v)


def test_pack_rejects_out_of_range_and_bad_sizes():
    with pytest.raises(ValueError, match="values must lie"):
        bits.pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="expected 1 uint8"):
        bits.unpack(torch.zeros(2, dtype=torch.uint8), 3, 2)


def _round_trip(codec, tree, key=7):
    payload, _ = codec.encode(tree, codec.init(tree), key)
    back = codec.decode(wire.loads(wire.dumps(payload)))
    assert set(back) == set(tree)
    for k in tree:
        assert back[k].shape == tree[k].shape and back[k].dtype == tree[k].dtype
    return back


TREE = {"w": torch.randn(30, 20, generator=torch.Generator().manual_seed(0)),
        "b": torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}


def test_clip_l2_and_linf():
    back = _round_trip(codecs.clip_l2(1.5), TREE)
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in back.values()))
    assert norm == pytest.approx(1.5, rel=1e-6)
    ratio = back["w"] / TREE["w"]
    assert float(ratio.max() - ratio.min()) < 1e-6  # one common factor: direction kept
    small = {"x": torch.tensor([0.3, -0.4])}
    assert torch.equal(_round_trip(codecs.clip_l2(1.0), small)["x"], small["x"])
    back = _round_trip(codecs.clip_linf(0.5), TREE)
    assert float(back["w"].abs().max()) == 0.5
    inside = TREE["w"].abs() < 0.5
    assert torch.equal(back["w"][inside], TREE["w"][inside])
    for c in (codecs.clip_l2(1.0), codecs.clip_linf(1.0)):
        assert c.event is None and not c.unbiased and not c.linear


def test_gaussian_noise_statistics_and_event():
    zeros = {"z": torch.zeros(200_000, dtype=torch.float64), "h": torch.zeros(10, dtype=torch.float16)}
    codec = codecs.gaussian_noise(1.5, 2.0)
    noise = _round_trip(codec, zeros)["z"]
    assert float(noise.mean()) == pytest.approx(0.0, abs=4 * 3.0 / math.sqrt(2e5))
    assert float(noise.std()) == pytest.approx(3.0, rel=0.01)  # std = multiplier * sensitivity
    assert codec.event == events.gaussian(1.5) and codec.unbiased and codec.linear
    again = _round_trip(codec, zeros)["z"]
    assert torch.equal(noise, again)  # same key, same noise
    assert not torch.equal(noise, _round_trip(codec, zeros, key=rng.fold(7, 1))["z"])


def test_laplace_noise_statistics_and_event():
    zeros = {"z": torch.zeros(200_000, dtype=torch.float64)}
    codec = codecs.laplace_noise(0.5, 4.0)  # scale 2
    noise = _round_trip(codec, zeros)["z"]
    assert float(noise.abs().mean()) == pytest.approx(2.0, rel=0.01)  # E|X| = scale
    assert float(noise.std()) == pytest.approx(2.0 * math.sqrt(2), rel=0.01)
    assert codec.event == events.laplace(0.5)


def test_clip_then_noise_chain_declares_the_noise_event():
    c = codecs.chain(codecs.clip_l2(1.0), codecs.gaussian_noise(1.1, 1.0))
    assert c.event == events.gaussian(1.1) and not c.unbiased
    _round_trip(c, TREE)
    with pytest.raises(ValueError, match="sensitivity"):
        codecs.gaussian_noise(1.0, 0.0)
