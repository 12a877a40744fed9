"""Optimizers against torch.optim (bit-for-bit up to 1e-12 in float64), against NumPy
references of Reddi et al. 2021 (FedAdam, FedYogi, FedAdagrad), and under torch.func."""
import numpy as np
import pytest
import torch
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from atoll import tree as T
from atoll.transforms import (add_decayed_weights, adagrad, adam, apply_updates, chain, momentum,
                              proximal, sgd, yogi)

STEPS = 20
SHAPES = {"w": (3, 4), "b": (4,)}


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _grads(seed, n=STEPS):
    return [_params(seed * 1000 + i) for i in range(n)]


def _run(transform, params, grads):
    """Feed ``grads`` to ``transform``; the list of parameters after each step."""
    state, out = transform.init(params), []
    for g in grads:
        updates, state = transform.update(g, state, params, {})
        params = apply_updates(params, updates)
        out.append(params)
    return out


def _run_torch(opt_cls, params, grads, **kw):
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt, out = opt_cls(list(ps.values()), **kw), []
    for g in grads:
        for k, p in ps.items():
            p.grad = g[k].clone()
        opt.step()
        out.append({k: p.detach().clone() for k, p in ps.items()})
    return out


def _assert_trajectories(ours, ref, atol=1e-12):
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for k in a:
            err = (a[k] - torch.as_tensor(b[k])).abs().max().item()
            assert err <= atol, f"step {step}, leaf {k}: max error {err:.3e}"


TORCH_CASES = [
    ("sgd", sgd, torch.optim.SGD, dict(lr=0.1)),
    ("sgd-momentum", sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    ("sgd-nesterov", sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("sgd-dampening", sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.3)),
    ("sgd-wd", sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.05)),
    ("sgd-wd-plain", sgd, torch.optim.SGD, dict(lr=0.1, weight_decay=0.05)),
    ("adam", adam, torch.optim.Adam, dict(lr=1e-2)),
    ("adam-wd", adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6,
                                             weight_decay=0.1)),
    ("adagrad", adagrad, torch.optim.Adagrad, dict(lr=0.1)),
    ("adagrad-init-wd", adagrad, torch.optim.Adagrad,
     dict(lr=0.1, eps=1e-6, initial_accumulator_value=0.5, weight_decay=0.05)),
]


@pytest.mark.parametrize("name,ours,theirs,kw", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch_optim(name, ours, theirs, kw):
    params, grads = _params(0), _grads(1)
    ours_kw = dict(kw)
    if "betas" in ours_kw:
        ours_kw["b1"], ours_kw["b2"] = ours_kw.pop("betas")
    _assert_trajectories(_run(ours(**ours_kw), params, grads),
                         _run_torch(theirs, params, grads, **kw))


def test_momentum_alias_and_chained_weight_decay():
    params, grads = _params(2), _grads(3)
    _assert_trajectories(_run(momentum(0.1, beta=0.7, nesterov=True), params, grads),
                         _run(sgd(0.1, momentum=0.7, nesterov=True), params, grads), atol=0.0)
    _assert_trajectories(_run(chain(add_decayed_weights(0.05), adam(1e-2)), params, grads),
                         _run(adam(1e-2, weight_decay=0.05), params, grads), atol=0.0)


def test_invalid_hyperparameters():
    with pytest.raises(ValueError):
        sgd(0.1, nesterov=True)
    with pytest.raises(ValueError):
        sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError):
        adam(-1.0)


# --- Reddi et al. 2021, Algorithm 2, written out in NumPy -------------------------------

def _reddi_numpy(rule, params, grads, lr, b1, b2, tau, v0):
    x = {k: v.numpy().copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(a, v0) for k, a in x.items()}
    out = []
    for g in grads:
        for k in x:
            d = g[k].numpy()
            m[k] = b1 * m[k] + (1 - b1) * d
            if rule == "adagrad":
                v[k] = v[k] + d ** 2
            elif rule == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d ** 2
            else:  # yogi
                v[k] = v[k] - (1 - b2) * d ** 2 * np.sign(v[k] - d ** 2)
            x[k] = x[k] - lr * m[k] / (np.sqrt(v[k]) + tau)
        out.append({k: a.copy() for k, a in x.items()})
    return out


def test_fedadam_matches_paper():
    params, grads = _params(4), _grads(5)
    ours = _run(adam(0.03, b1=0.9, b2=0.99, eps=1e-3, bias_correction=False), params, grads)
    _assert_trajectories(ours, _reddi_numpy("adam", params, grads, 0.03, 0.9, 0.99, 1e-3, 0.0))


def test_fedyogi_matches_paper():
    params, grads = _params(6), _grads(7)
    ours = _run(yogi(0.03, b1=0.9, b2=0.99, eps=1e-3, initial_v=0.7), params, grads)
    _assert_trajectories(ours, _reddi_numpy("yogi", params, grads, 0.03, 0.9, 0.99, 1e-3, 0.7))


def test_fedadagrad_momentum_matches_paper():
    params, grads = _params(8), _grads(9)
    ours = _run(adagrad(0.03, eps=1e-3, initial_accumulator_value=1e-6, b1=0.9), params, grads)
    ref = _reddi_numpy("adagrad", params, grads, 0.03, 0.9, None, 1e-3, 1e-6)
    _assert_trajectories(ours, ref)


@pytest.mark.parametrize("rule", ["adam", "yogi", "adagrad"])
def test_adaptive_recipes_start_v_at_tau_squared(rule):
    """Reddi et al. 2021, Algorithm 2: ``v_{-1} = tau^2`` (``initial_v = 0`` stays an option).
    Pseudo-gradients of size 1e-3 make the start visible: ``(1 - b2) g^2 ~ tau^2``."""
    from atoll import algorithms as A

    recipe = {"adam": A.fedadam, "yogi": A.fedyogi, "adagrad": A.fedadagrad}[rule]
    params, grads = _params(11), [{k: 1e-3 * v for k, v in g.items()} for g in _grads(12)]
    extra = {} if rule == "adagrad" else {"b2": 0.99}
    ends = []
    for kw, v0 in (({}, 1e-6), ({"initial_v": 0.0}, 0.0)):
        ours = _run(recipe(server_lr=0.03, b1=0.9, tau=1e-3, **extra, **kw).server_opt, params, grads)
        _assert_trajectories(ours, _reddi_numpy(rule, params, grads, 0.03, 0.9, 0.99, 1e-3, v0))
        ends.append(ours[-1])
    assert max(float((ends[0][k] - ends[1][k]).abs().max()) for k in params) > 1e-3


# --- torch.func: vmap over clients, grad through updates --------------------------------

def _stack(trees):
    leaves = [tree_flatten(t)[0] for t in trees]
    spec = tree_flatten(trees[0])[1]
    return tree_unflatten([torch.stack(ls) for ls in zip(*leaves)], spec)


VMAP_CASES = {
    "sgd-momentum": lambda: sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda: adam(1e-2, weight_decay=0.01),
    "fedadam": lambda: adam(1e-2, bias_correction=False),
    "yogi": lambda: yogi(1e-2),
    "adagrad": lambda: adagrad(0.1, initial_accumulator_value=0.1, b1=0.5),
    "prox-sgd": lambda: chain(proximal(0.1), sgd(0.05, momentum=0.9)),
}


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_vmap_matches_separate_clients(name):
    t = VMAP_CASES[name]()
    clients = [_params(10 + c) for c in range(3)]
    grads = [_grads(20 + c, n=4) for c in range(3)]
    states = [t.init(p) for p in clients]
    P, S = _stack(clients), _stack(states)
    step = vmap(lambda g, s, p: t.update(g, s, p, {}))
    for i in range(4):
        U, S = step(_stack([g[i] for g in grads]), S, P)
        P = apply_updates(P, U)
        for c in range(3):
            u, states[c] = t.update(grads[c][i], states[c], clients[c], {})
            clients[c] = apply_updates(clients[c], u)
        for c in range(3):
            for k in P:
                assert torch.allclose(P[k][c], clients[c][k], rtol=0, atol=1e-12)
            flat_s = tree_flatten(tree_map(lambda x: x[c], S))[0]
            for a, b in zip(flat_s, tree_flatten(states[c])[0]):
                assert torch.allclose(a, b.to(a.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_grad_through_updates(name):
    """torch.func.grad through two steps (grads depend on params) matches torch.autograd."""
    t = VMAP_CASES[name]()
    c = _params(30)

    def f(p):
        state = t.init(p)
        for _ in range(2):
            g = {k: c[k] * p[k] ** 2 + 0.1 for k in p}
            u, state = t.update(g, state, p, {})
            p = apply_updates(p, u)
        return sum((v ** 2).sum() for v in p.values())

    p0 = _params(31)
    ours = torch.func.grad(f)(p0)
    leaves = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    ref = torch.autograd.grad(f(leaves), list(leaves.values()))
    for (k, a), b in zip(ours.items(), ref):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), k


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_state_is_a_tree_of_tensors(name):
    leaves = tree_flatten(VMAP_CASES[name]().init(_params(0)))[0]
    assert leaves and all(isinstance(x, torch.Tensor) for x in leaves)


# --- proximal ---------------------------------------------------------------------------

def test_proximal_pulls_towards_anchor():
    lr, mu = 0.05, 0.3
    anchor = _params(40)
    t = chain(proximal(mu), sgd(lr))
    state = t.init(anchor)
    p = _params(41)
    zero = T.zeros_like(p)
    updates, state = t.update(zero, state, p, {})
    for k in p:
        assert torch.equal(updates[k], -lr * (mu * (p[k] - anchor[k])))
    # the anchor is a detached copy: it stays put as params move
    assert all(torch.equal(state[0]["anchor"][k], anchor[k]) for k in anchor)
    # at the anchor, the correction is the identity
    g = _params(42)
    u, _ = proximal(mu).update(g, proximal(mu).init(anchor), anchor, {})
    assert all(torch.equal(u[k], g[k]) for k in g)


def test_proximal_rejects_negative_mu():
    with pytest.raises(ValueError):
        proximal(-0.1)
