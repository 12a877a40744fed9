"""DP intrinsic quantization (US 11,017,322 B1, FIG. 4): unbiased, error uniform and independent
of the input, Irwin-Hall privacy noise, exact payload size, integer == float aggregation."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from atoll import codecs, rng
from atoll.codecs import intrinsic
from atoll.privacy import events
from atoll.privacy.irwin_hall import ih_cdf
from atoll.transport import wire


def _x(d=4000, seed=0, scale=0.5):
    return {"g": scale * torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)}


def _decode(codec, tree, key):
    payload, _ = codec.encode(tree, (), key)
    return codec.decode(wire.loads(wire.dumps(payload)))


def test_conformance_shapes_dtypes_and_keys():
    g = torch.Generator().manual_seed(0)  # inside the clip bound 3.0: the error bound holds
    tree = {"a/w": torch.randn(3, 4, generator=g).clamp(-2.9, 2.9),
            "b": torch.randn(5, generator=g, dtype=torch.float64).clamp(-2.9, 2.9),
            "c": torch.randn(2, 1, 2, generator=g).clamp(-2.9, 2.9)}
    codec = codecs.dithered_quantize(0.1, 2, 3.0)
    back = _decode(codec, tree, 1)
    assert list(back) == list(tree)
    for k in tree:
        assert back[k].shape == tree[k].shape and back[k].dtype == tree[k].dtype
        assert float((back[k].double() - tree[k].double()).abs().max()) <= 3 * 0.1 / 2 + 1e-6
    assert codec.unbiased and not codec.linear and codec.event is None


def test_unbiased_over_many_keys():
    x = _x(d=200)
    codec = codecs.dithered_quantize(0.2, 1, 2.0, count=2.0)  # step 0.1, noise: 2 uniforms
    mean = torch.stack([_decode(codec, x, k)["g"] for k in range(3000)]).mean(0)
    sd = 0.1 * math.sqrt(2 / 12) / math.sqrt(3000)
    assert float((mean - x["g"]).abs().max()) < 5 * sd


def test_error_is_uniform_and_independent_of_the_input_without_extra_noise():
    x = _x(d=50_000, scale=1.0)
    step = 0.25
    err = (_decode(codecs.dithered_quantize(step, 0, 8.0), x, 3)["g"] - x["g"]).numpy()
    assert np.abs(err).max() <= step / 2 + 1e-12
    assert stats.kstest(err / step, stats.uniform(loc=-0.5, scale=1).cdf).pvalue > 0.01
    assert abs(np.corrcoef(err, x["g"].numpy())[0, 1]) < 0.02
    assert abs(np.corrcoef(err, np.abs(x["g"].numpy()) % step)[0, 1]) < 0.02  # not a function of x


def test_total_noise_is_irwin_hall_of_z_plus_one_uniforms():
    """What the server sees minus the input: Z uniforms plus the dithered quantization error."""
    x, step, z = _x(d=50_000), 0.1, 3
    err = (_decode(codecs.dithered_quantize(step, z, 2.0), x, 5)["g"] - x["g"]).numpy()
    std = err / step + (z + 1) / 2  # standard Irwin-Hall(Z + 1) on [0, Z + 1]
    assert stats.kstest(std, lambda s: ih_cdf(s, z + 1)).pvalue > 0.01
    assert err.std() == pytest.approx(step * math.sqrt((z + 1) / 12), rel=0.02)


@pytest.mark.parametrize("delta,z,clip,count", [(0.1, 0, 1.0, 1.0), (0.5, 3, 1.0, 10.0), (0.3, 2, 0.05, 1.0)])
def test_payload_size_is_the_predicted_bits(delta, z, clip, count):
    x = _x(d=1001)
    payload, _ = codecs.dithered_quantize(delta, z, clip, count=count).encode(x, (), 9)
    k, nbits = intrinsic.levels(delta, z, clip, count)
    step = delta / count
    b = clip + z * step / 2  # the patent's range B; K = ceil(B / step)
    assert k == math.ceil(b / step - 1e-9) and nbits == math.ceil(math.log2(2 * k + 1))
    if (2 * b / step) % 2 == 0:  # B/step integer: the patent's M + 1 levels exactly
        assert 2 * k + 1 == math.ceil(2 * b / step) + 1
    without = dict(payload, q=torch.zeros(0, dtype=torch.uint8))
    assert len(wire.dumps(payload)) - len(wire.dumps(without)) == math.ceil(1001 * nbits / 8)
    assert payload["seed"].numel() == 1  # the dither travels as one seed, not 1001 floats


def test_integers_stay_in_range_at_the_clip_edges():
    x = {"g": torch.tensor([5.0, -5.0, 1.0, -1.0] * 500, dtype=torch.float64)}
    codec = codecs.dithered_quantize(0.2, 2, 1.0)
    payload, _ = codec.encode(x, (), 4)
    k, nbits = intrinsic.levels(0.2, 2, 1.0, 1.0)
    m = intrinsic.B.unpack(payload["q"], nbits, 2000) - k
    assert int(m.abs().max()) <= k
    back = codec.decode(payload)["g"]
    assert float((back - x["g"].clamp(-1, 1)).abs().max()) <= 3 * 0.2 / 2 + 1e-12


def test_count_sets_the_step_and_integer_aggregation_equals_float_aggregation():
    codec = codecs.dithered_quantize(0.5, 2, 1.0)
    counts = [3.0, 17.0, 8.0, 1.0]
    payloads, decoded = [], []
    for i, n in enumerate(counts):
        tree = {"w": 0.3 * torch.randn(6, 5, generator=torch.Generator().manual_seed(i), dtype=torch.float64),
                intrinsic.COUNT_KEY: torch.tensor(n)}
        p, _ = codec.encode(tree, (), rng.key(0, 1, i, "uplink"))
        p = wire.loads(wire.dumps(p))
        payloads.append(p)
        d = codec.decode(p)
        assert set(d) == {"w"} and float(p["count"][0]) == n
        assert float((d["w"] - tree["w"]).abs().max()) <= 3 * 0.5 / n / 2 + 1e-12  # step 0.5/n
        decoded.append(d["w"])
    weighted = sum(n * d for n, d in zip(counts, decoded)) / sum(counts)
    fast = intrinsic.aggregate_integers(payloads, 0.5, 2, 1.0)["w"]
    torch.testing.assert_close(fast, weighted, rtol=0, atol=1e-12)


def test_declared_event_and_bad_arguments():
    codec = codecs.dithered_quantize(0.5, 3, 0.1, dimension=1000, sample_rate=0.01)
    assert codec.event == events.intrinsic_quantization(4, 0.5, 0.1, 1000, 0.01)
    with pytest.raises(ValueError, match="integer Z"):
        codecs.dithered_quantize(0.5, 1.5, 0.1)
    with pytest.raises(ValueError, match="norm"):
        codecs.dithered_quantize(0.5, 1, 0.1, norm="l1")
    with pytest.raises(ValueError, match="missing"):
        codec.decode({"q": torch.zeros(1, dtype=torch.uint8)})


def test_l2_clip_option_bounds_the_norm():
    x = _x(d=100, scale=1.0)
    back = _decode(codecs.dithered_quantize(0.01, 0, 1.0, norm="l2"), x, 2)["g"]
    assert float(back.norm()) == pytest.approx(1.0, abs=0.01 * math.sqrt(100) / 2)
