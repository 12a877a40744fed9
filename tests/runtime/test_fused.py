"""The fused MLP/SGD engine: which updates it recognises, and client by client equality with
``local_training`` (and the generic vmap engine) in float64."""
import pytest
import torch

from atoll.client import local_training, model_loss, params_of
from atoll.models import zoo
from atoll.runtime.engine import VmapEngine
from atoll.runtime.vmap import select_engine
from atoll.runtime.fused import FusedMLP, match
from atoll.transforms import adam, chain, proximal, sgd
from atoll.transforms.optim import add_decayed_weights

CASES = {
    "2nn-sgd": (lambda: zoo.mlp(5, 3, (7, 6)), lambda: sgd(0.1)),
    "logreg-prox-wd": (lambda: zoo.logreg(5, 3), lambda: chain(proximal(0.3), sgd(0.1, weight_decay=0.01))),
    "mlp-prox-decay": (lambda: zoo.mlp(5, 3, (4,)),
                       lambda: chain(add_decayed_weights(0.02), proximal(0.5), sgd(0.2))),
    "nobias": (lambda: torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.ReLU(),
                                           torch.nn.Linear(4, 3)), lambda: sgd(0.3, weight_decay=0.1)),
}


@pytest.mark.parametrize("steps", [[7, 7, 5, 2, 0], [1, 1, 1, 0, 0]], ids=["many-steps", "one-step"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_local_training(case, steps):
    torch.manual_seed(0)
    make, transform = CASES[case]
    model = make().double()
    update = local_training(model_loss(model), transform())
    spec = match(update)
    assert spec is not None
    params = params_of(model)
    C, S, B = 5, max(steps), 3
    batches = {"x": torch.randn(C, S, B, 5, dtype=torch.float64), "y": torch.randint(0, 3, (C, S, B)),
               "mask": torch.rand(C, S, B) > 0.2}
    step_mask = torch.arange(S) < torch.tensor(steps)[:, None]
    args = (params, {}, {"params": params}, batches, step_mask, torch.arange(C))
    fused, generic = FusedMLP(spec).run(*args), VmapEngine(update).run(*args)
    for c in range(C):
        one = update(params, {}, {"params": params}, {k: v[c] for k, v in batches.items()}, step_mask[c], 0)
        for k in params:
            torch.testing.assert_close(fused.delta[k][c], one.delta[k], rtol=0, atol=1e-12)
            torch.testing.assert_close(generic.delta[k][c], one.delta[k], rtol=0, atol=1e-12)
        assert fused.loss[c] == pytest.approx(float(one.metrics["loss"]), abs=1e-12)
        assert (fused.samples[c], fused.steps[c]) == (float(one.metrics["samples"]), int(one.metrics["steps"]))


@pytest.mark.parametrize("make,transform", [
    (lambda: zoo.mlp(5, 3), lambda: adam(0.1)),
    (lambda: zoo.mlp(5, 3), lambda: sgd(0.1, momentum=0.9)),
    (lambda: zoo.cnn(), lambda: sgd(0.1)),
    (lambda: torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)), lambda: sgd(0.1)),
    (lambda: zoo.mlp(5, 3), lambda: chain(sgd(0.1), proximal(0.1))),  # correction after the optimizer
], ids=["adam", "momentum", "cnn", "tanh", "prox-after-sgd"])
def test_everything_else_takes_the_generic_path(make, transform):
    update = local_training(model_loss(make()), transform())
    assert match(update) is None
    assert isinstance(select_engine(update), VmapEngine)


def test_non_prefix_step_masks_fall_back_to_generic():
    model = zoo.mlp(5, 3, (4,)).double()
    update = local_training(model_loss(model), sgd(0.1))
    params = params_of(model)
    batches = {"x": torch.randn(2, 3, 2, 5, dtype=torch.float64), "y": torch.randint(0, 3, (2, 3, 2)),
               "mask": torch.ones(2, 3, 2, dtype=torch.bool)}
    step_mask = torch.tensor([[True, False, True], [True, True, False]])
    res = FusedMLP(match(update)).run(params, {}, {"params": params}, batches, step_mask, torch.arange(2))
    one = update(params, {}, {"params": params}, {k: v[0] for k, v in batches.items()}, step_mask[0], 0)
    for k in params:
        torch.testing.assert_close(res.delta[k][0], one.delta[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [[1, 1, 1, 1, 0, 0], [2, 2, 1, 1, 1, 0]], ids=["one-step", "two-steps"])
@pytest.mark.parametrize("width", [1, 2, 3], ids=["rank1", "rank2", "rank3"])
def test_tiny_clients_into_strided_out(width, steps):
    """Clients smaller than a batch (trimmed batches, outer-product gradients) trained into
    strided ``out`` tensors (rows of a message buffer) give local_training's deltas there."""
    torch.manual_seed(1)
    model = zoo.mlp(5, 3, (7, 6)).double()
    update = local_training(model_loss(model), chain(proximal(0.2), sgd(0.1, weight_decay=0.01)))
    params = params_of(model)
    C, S, B = len(steps), max(steps), 10
    sizes = torch.tensor([width, 1, width, 0, width, 1])
    mask = (torch.arange(B) < sizes[:, None, None]).expand(C, S, B).clone()
    batches = {"x": torch.randn(C, S, B, 5, dtype=torch.float64), "y": torch.randint(0, 3, (C, S, B)),
               "mask": mask}
    step_mask = torch.arange(S) < torch.tensor(steps)[:, None]
    numel = sum(v.numel() for v in params.values())
    buf = torch.full((C, numel + 3), float("nan"), dtype=torch.float64)
    out, at = {}, 1
    for k, v in params.items():
        out[k] = buf[:, at:at + v.numel()].view(C, *v.shape)
        at += v.numel()
    res = FusedMLP(match(update)).run(params, {}, {"params": params}, batches, step_mask,
                                      torch.arange(C), out=out)
    for c in range(C):
        one = update(params, {}, {"params": params}, {k: v[c] for k, v in batches.items()}, step_mask[c], 0)
        for k in params:
            assert res.delta[k].data_ptr() == out[k].data_ptr()
            torch.testing.assert_close(out[k][c], one.delta[k], rtol=0, atol=1e-12)
        assert res.loss[c] == pytest.approx(float(one.metrics["loss"]), abs=1e-12)
