"""Per-FedAvg on least-squares clients (quadratic_ls.py): the MAML objective's minimizer and the
personalized models in closed form, the Hessian-free meta-gradient against exact second-order
autograd, loop == vmap."""
import pytest
import torch
from torch.func import grad

from atoll import algorithms as A
from atoll import personalization
from atoll.client import model_loss
from atoll.models import build
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.transforms import sgd

import quadratic_ls as q

ALPHA, BETA = 0.2, 0.3  # the personalization step, the local (meta) step


def curvatures(variant):
    """Client i's meta-gradient is C_i (w - x_i): grad f_i(w - alpha grad f_i(w)) =
    H_i (I - alpha H_i) (w - x_i) (fo); times (I - alpha H_i) once more (hf, the MAML gradient)."""
    eye = torch.eye(q.D, dtype=torch.float64)
    return [(eye - ALPHA * h) @ h @ (eye - ALPHA * h) if variant == "hf" else h @ (eye - ALPHA * h)
            for h in q.hessians()]


def maml_gradient(w):
    """The slow oracle: autograd's gradient of sum_i p_i f_i(w - alpha grad f_i(w))."""
    w = w.clone().requires_grad_(True)
    total = 0.0
    for p, c in zip(q.weights(), q.data().clients):
        mask = torch.ones(len(c.y), dtype=torch.bool)
        inner = torch.autograd.grad(q.loss_fn({"w": w}, c.x, c.y, mask), w, create_graph=True)[0]
        total = total + p * q.loss_fn({"w": w - ALPHA * inner}, c.x, c.y, mask)
    return torch.autograd.grad(total, w)[0]


def dist(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("variant,steps", [("hf", [1] * 4), ("fo", [1] * 4), ("hf", [1, 3, 6, 10]),
                                           ("fo", [1, 3, 6, 10])])
def test_global_and_personalized_models_reach_the_closed_form(variant, steps):
    """w stops at FedAvg's fixed point for the local map w <- w - beta C_i (w - x_i); with one
    local step and hf that is the MAML objective's minimizer (its autograd gradient vanishes
    there). Client i's model: one step w* - alpha H_i (w* - x_i) on its training data."""
    alg = A.per_fedavg(sgd(BETA), alpha=ALPHA, variant=variant, server_lr=1.5)
    state, _ = q.train(alg, 100 if steps == [1] * 4 else 40, steps)
    w = q.fixed_point(curvatures(variant), BETA, steps)
    assert dist(state.params["w"], w) < 1e-6
    if variant == "hf" and steps == [1] * 4:
        assert float(maml_gradient(w).abs().max()) < 1e-12
    elif steps == [1] * 4:  # fo stops elsewhere
        assert float(maml_gradient(w).abs().max()) > 1e-3
    update = alg.client(q.loss_fn)
    for i, (h, x) in enumerate(zip(q.hessians(), q.own_optima())):
        mine = personalization.adapted(alg, update, state.params, q.data().clients[i], i, 0)
        assert dist(mine["w"], w - ALPHA * h @ (w - x)) < 1e-6
        assert dist(mine["w"], w) > 1e-2


def test_adapt_steps_are_steps_of_gradient_descent():
    alg = A.per_fedavg(sgd(BETA), alpha=ALPHA, adapt_steps=3)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    c, h, x = q.data().clients[2], q.hessians()[2], q.own_optima()[2]
    mine = alg.adapt(q.loss_fn, {"w": w}, c.x, c.y)["w"]
    eye = torch.eye(q.D, dtype=torch.float64)
    assert dist(mine, x + torch.linalg.matrix_power(eye - ALPHA * h, 3) @ (w - x)) < 1e-12
    assert torch.equal(A.per_fedavg(adapt_steps=0).adapt(q.loss_fn, {"w": w}, c.x, c.y)["w"], w)


def test_hessian_free_step_matches_second_order_autograd_on_an_mlp():
    """One local step of sgd(1): delta = -meta-gradient. hf's finite difference against the exact
    MAML gradient (double backward through the inner step) of a small tanh MLP, float64."""
    torch.manual_seed(0)
    model = build("mlp", 5, 3, seed=0, hidden=[7]).double()
    loss = model_loss(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(1, 12, 5, dtype=torch.float64), torch.randint(0, 3, (1, 12))
    batches, mask = {"x": x, "y": y, "mask": torch.ones(1, 12, dtype=torch.bool)}, torch.ones(1, dtype=torch.bool)

    def maml(p):
        g = grad(loss)(p, x[0], y[0], batches["mask"][0])
        return loss({k: v - ALPHA * g[k] for k, v in p.items()}, x[0], y[0], batches["mask"][0])

    exact = grad(maml)(params)
    first = grad(loss)({k: v - ALPHA * grad(loss)(params, x[0], y[0], batches["mask"][0])[k]
                        for k, v in params.items()}, x[0], y[0], batches["mask"][0])
    for variant, want in (("hf", exact), ("fo", first)):
        alg = A.per_fedavg(sgd(1.0), alpha=ALPHA, variant=variant, delta=1e-4)
        res = alg.client(loss)(params, {}, {"params": params}, batches, mask, 0)
        scale = max(float(v.abs().max()) for v in want.values())
        assert max(dist(-res.delta[k], want[k]) for k in params) < 1e-6 * scale
    assert max(dist(exact[k], first[k]) for k in params) > 1e-3 * scale  # the two really differ


def test_loop_and_vmap_agree_and_runs_repeat():
    alg = A.per_fedavg(sgd(BETA), alpha=ALPHA, variant="hf")
    runs = [q.train(alg, 3, [1, 3, 6, 10], rt)[0].params["w"] for rt in (LoopRuntime(), LoopRuntime(), VmapRuntime())]
    assert torch.equal(runs[0], runs[1]) and dist(runs[0], runs[2]) < 1e-12


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="variant"):
        A.per_fedavg(variant="so")
    with pytest.raises(ValueError, match="alpha"):
        A.per_fedavg(alpha=0.0)
