"""Worker momentum: the message is the exponential moving average of the client's updates."""
import pytest
import torch

from atoll.codecs import build_codec, chain, top_k, worker_momentum


def test_message_is_the_ema_of_the_updates_and_state_carries_it():
    c = worker_momentum(0.9)
    g = torch.Generator().manual_seed(0)
    ups = [{"w": torch.randn(4, 3, generator=g, dtype=torch.float64)} for _ in range(5)]
    state, ref = c.init(ups[0]), torch.zeros(4, 3, dtype=torch.float64)
    for u in ups:
        payload, state = c.encode(u, state, 0)
        ref = 0.9 * ref + (1 - 0.9) * u["w"]  # the codec's own arithmetic
        assert torch.equal(c.decode(payload)["w"], ref) and torch.equal(state["w"], ref)


def test_beta_zero_is_the_identity_and_bad_beta_is_named():
    u = {"w": torch.arange(6.0).reshape(2, 3)}
    c = worker_momentum(0.0)
    assert torch.equal(c.encode(u, c.init(u), 0)[0]["w"], u["w"])
    with pytest.raises(ValueError, match="beta must be in"):
        worker_momentum(1.0)


def test_chains_before_a_compressor_and_builds_from_a_spec():
    u = {"w": torch.arange(10.0)}
    c = build_codec("worker_momentum(0.5)+top_k(0.2)")
    ref = chain(worker_momentum(0.5), top_k(0.2))
    got, _ = c.encode(u, c.init(u), 0)
    want, _ = ref.encode(u, ref.init(u), 0)
    assert torch.equal(c.decode(got)["w"], ref.decode(want)["w"])
    assert int((c.decode(got)["w"] != 0).sum()) == 2
    with pytest.raises(ValueError, match="worker_momentum first"):
        c2 = worker_momentum(0.5)
        c2.encode({"v": torch.ones(2)}, c2.init(u), 0)
