"""The b-bit stochastic quantizer of the privacy comparison: unbiased, bounded error, exact size."""
import pytest
import torch

from atoll.codecs.stochastic_round import stochastic_quantize
from atoll.transport import wire


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_unbiased_bounded_and_packed(bits):
    g = torch.Generator().manual_seed(0)
    tree = {"w": torch.randn(7, 5, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g)}
    codec = stochastic_quantize(bits)
    s = float(max(v.abs().max() for v in tree.values()))
    step = 2 * s / (2 ** bits - 1)
    outs = []
    for key in range(4000):
        payload, _ = codec.encode(tree, (), key)
        assert payload["q"].numel() == (38 * bits + 7) // 8  # 38 coordinates, b bits each
        out = codec.decode(wire.loads(wire.dumps(payload)))
        assert out["w"].dtype == torch.float64 and out["b"].dtype == torch.float32
        for k in tree:
            assert float((out[k].double() - tree[k].double()).abs().max()) <= step * (1 + 1e-6)
        outs.append(out)
    for k in tree:
        mean = torch.stack([o[k].double() for o in outs]).mean(0)
        # std of one draw <= step/2: the mean of 4000 is within 5 standard errors
        assert float((mean - tree[k].double()).abs().max()) < 5 * (step / 2) / 4000 ** 0.5


def test_bad_bits_are_refused():
    with pytest.raises(ValueError, match="bits"):
        stochastic_quantize(0)
