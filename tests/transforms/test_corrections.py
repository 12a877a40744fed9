"""Local corrections (transforms.corrections)."""
import torch


def test_shift_adds_the_constant_to_the_gradient_entries_only():
    from atoll.transforms import chain, sgd, shift

    c = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64), "running": torch.tensor([5.0], dtype=torch.float64)}
    g = {"w": torch.tensor([0.5, 0.5], dtype=torch.float64)}
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    t = chain(shift(c), sgd(0.1))
    upd, _ = t.update(g, t.init(params), params, {})
    assert set(upd) == {"w"}  # the buffer entry of c is ignored: it is not a gradient
    assert torch.equal(upd["w"], -0.1 * torch.tensor([1.5, -1.5], dtype=torch.float64))
