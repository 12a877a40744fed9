"""Batch index plans: one permutation per epoch, -1 padding, steps as a prefix of epochs."""
import pytest
import torch

from atoll import rng
from atoll.data import batch_indices, gather, num_steps


def g(seed=0):
    return rng.generator(rng.key(seed, 1, 2, "batches"))


def test_num_steps():
    assert num_steps(23, 5, 3) == 15 and num_steps(20, 5, 2) == 8
    assert num_steps(0, 5, 3) == 0 and num_steps(1, 64, 1) == 1


def test_every_sample_once_per_epoch_with_padding():
    n, b, e = 23, 5, 3
    idx = batch_indices(n, b, epochs=e, generator=g())
    assert idx.shape == (15, 5) and idx.dtype == torch.long
    for epoch in idx.view(e, 5, b):
        valid = epoch[epoch >= 0]
        assert torch.equal(torch.sort(valid).values, torch.arange(n))
        assert (epoch[:-1] >= 0).all() and (epoch[-1] == -1).sum() == 2  # 25 - 23 pads, last batch
    epochs = idx.view(e, 5 * b)
    assert not torch.equal(epochs[0], epochs[1])  # a fresh permutation each epoch


def test_steps_prefix_and_epochs_equivalence():
    n, b = 23, 5
    full = batch_indices(n, b, epochs=3, generator=g())
    assert torch.equal(batch_indices(n, b, steps=num_steps(n, b, 3), generator=g()), full)
    assert torch.equal(batch_indices(n, b, steps=7, generator=g()), full[:7])
    long = batch_indices(n, b, steps=40, generator=g())
    assert long.shape == (40, 5) and torch.equal(long[:15], full)
    assert batch_indices(n, b, steps=0, generator=g()).shape == (0, 5)


def test_reproducible_from_generator_seed():
    a = batch_indices(50, 8, epochs=2, generator=g(0))
    assert torch.equal(a, batch_indices(50, 8, epochs=2, generator=g(0)))
    assert not torch.equal(a, batch_indices(50, 8, epochs=2, generator=g(1)))


def test_gather_shapes_and_mask():
    x = torch.arange(14.0).reshape(7, 2) + 1
    y = torch.arange(7) * 10
    idx = batch_indices(7, 3, epochs=2, generator=g())
    xb, yb, mask = gather(x, y, idx)
    assert xb.shape == (6, 3, 2) and yb.shape == (6, 3) and mask.shape == (6, 3)
    assert torch.equal(mask, idx >= 0) and mask.sum() == 14
    assert torch.equal(xb[mask], x[idx[mask]]) and torch.equal(yb[mask], y[idx[mask]])
    assert torch.equal(xb[~mask], x[0].expand(4, 2)) and (yb[~mask] == y[0]).all()


def test_empty_client():
    idx = batch_indices(0, 4, steps=3, generator=g())
    assert idx.shape == (3, 4) and (idx == -1).all()
    assert batch_indices(0, 4, epochs=2, generator=g()).shape == (0, 4)
    xb, yb, mask = gather(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), idx)
    assert xb.shape == (3, 4, 5) and (xb == 0).all() and yb.shape == (3, 4) and not mask.any()


def test_exactly_one_of_epochs_and_steps():
    with pytest.raises(ValueError, match="exactly one"):
        batch_indices(5, 2, generator=g())
    with pytest.raises(ValueError, match="exactly one"):
        batch_indices(5, 2, epochs=1, steps=3, generator=g())
