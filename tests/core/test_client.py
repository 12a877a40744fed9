"""local_training against a plain PyTorch training loop, in float64."""
import copy

import torch
import torch.nn.functional as F

from atoll import tree as T
from atoll.client import local_training, model_loss, params_of
from atoll.transforms import chain, proximal, sgd


def _setup(seed=0, steps=6, batch=5):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(steps, batch, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (steps, batch))
    mask = torch.ones(steps, batch, dtype=torch.bool)
    mask[-1, 3:] = False  # a padded last batch
    return model, {"x": x, "y": y, "mask": mask}


def _torch_loop(model, batches, lr, momentum, steps, mu=0.0):
    m = copy.deepcopy(model)
    anchor = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)
    for s in range(steps):
        keep = batches["mask"][s]
        loss = F.cross_entropy(m(batches["x"][s][keep]), batches["y"][s][keep])
        loss = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dict(m.named_parameters())


def test_matches_plain_pytorch_loop():
    for momentum in (0.0, 0.9):
        model, batches = _setup()
        params = params_of(model)
        update = local_training(model_loss(model), sgd(0.1, momentum=momentum))
        res = update(params, {}, {"params": params}, batches, torch.ones(6, dtype=torch.bool), 0)
        expect = _torch_loop(model, batches, 0.1, momentum, 6)
        for k in params:
            torch.testing.assert_close(params[k] + res.delta[k], expect[k].detach(), rtol=0, atol=1e-12)
        assert int(res.metrics["steps"]) == 6 and float(res.metrics["samples"]) == 28


def test_proximal_matches_loop_with_prox_term():
    model, batches = _setup(1)
    params = params_of(model)
    update = local_training(model_loss(model), chain(proximal(0.5), sgd(0.1)))
    res = update(params, {}, {"params": params}, batches, torch.ones(6, dtype=torch.bool), 0)
    expect = _torch_loop(model, batches, 0.1, 0.0, 6, mu=0.5)
    for k in params:
        torch.testing.assert_close(params[k] + res.delta[k], expect[k].detach(), rtol=0, atol=1e-12)


def test_masked_steps_leave_parameters_untouched():
    model, batches = _setup(2)
    params = params_of(model)
    update = local_training(model_loss(model), sgd(0.1, momentum=0.9))
    mask = torch.tensor([True, True, True, False, False, False])
    res = update(params, {}, {"params": params}, batches, mask, 0)
    expect = _torch_loop(model, batches, 0.1, 0.9, 3)
    for k in params:
        torch.testing.assert_close(params[k] + res.delta[k], expect[k].detach(), rtol=0, atol=1e-12)
    assert int(res.metrics["steps"]) == 3 and float(res.metrics["samples"]) == 15
    none = update(params, {}, {"params": params}, batches, torch.zeros(6, dtype=torch.bool), 0)
    assert float(T.norm(none.delta)) == 0.0
