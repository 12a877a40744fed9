"""DP-SGD: ghost clipping == materialised per-sample gradients (float64), clipping, noise,
Poisson sampling, and loop == vmap over clients (vmap of vmap)."""
import pytest
import torch
from torch import nn
from torch.func import vmap

from atoll import privacy as P
from atoll.privacy import ghost as G
from atoll.algorithms.dp import dp_local_training
from atoll.privacy.dpsgd import dp_inputs, poisson_batches
from atoll.transforms.optim import sgd


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def _seq():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)).double()


def _params(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _linear():
    torch.manual_seed(1)
    return nn.Linear(5, 3).double()


@pytest.mark.parametrize("make,xshape", [(_mlp, (9, 5)), (_seq, (9, 3, 4)), (_linear, (9, 5))])
def test_ghost_norms_and_clipped_sums_equal_materialised(make, xshape):
    m, g = make(), torch.Generator().manual_seed(2)
    p = _params(m)
    x = 3 * torch.randn(xshape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (xshape[0],), generator=g)
    grads = G.per_sample_grads(m, p, x, y)
    stack = G.linear_stack(m)
    losses, inputs, outgrads = G.ghost_forward(stack, p, x, y)
    norms = G.ghost_norms(inputs, outgrads)
    torch.testing.assert_close(norms, G.norms_of(grads), rtol=0, atol=1e-10)
    torch.testing.assert_close(losses, G.per_sample_losses(m, p, x, y), rtol=0, atol=1e-12)
    factors = torch.clamp(0.5 / norms, max=1.0)
    ref, fast = G.weighted_sum(grads, factors), G.ghost_weighted_sum(stack, inputs, outgrads, factors)
    for k in p:
        torch.testing.assert_close(fast[k], ref[k], rtol=0, atol=1e-10)
    outer = G.ghost_per_sample_grads(stack, inputs, outgrads)  # per-coordinate clipping's input
    for k in p:
        torch.testing.assert_close(outer[k], grads[k], rtol=0, atol=1e-10)


def test_linear_stack_rejects_models_with_other_parameters():
    assert G.linear_stack(nn.Sequential(nn.Conv1d(1, 1, 3), nn.Linear(3, 2))) is None
    assert G.linear_stack(nn.Linear(3, 2, bias=False)) is None
    assert G.linear_stack(nn.Linear(3, 2)) == [("linear", "")]  # a bare layer (logistic regression)
    with pytest.raises(ValueError, match="ghost"):
        dp_local_training(nn.Linear(3, 2, bias=False), sgd(0.1), 1.0, 1.0, 0.1, use_ghost=True)


def _client_data(seed, n=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_ghost_and_vmap_updates_agree_and_int_key_equals_predrawn():
    m = _mlp()
    p = _params(m)
    x, y = _client_data(3)
    batches = poisson_batches(x, y, steps=4, q=0.3, key=11)
    steps = torch.ones(4, dtype=torch.bool)
    fast = dp_local_training(m, sgd(0.1), 1.0, 1.1, 0.3, use_ghost=True)(p, {}, {}, batches, steps, 5)
    slow = dp_local_training(m, sgd(0.1), 1.0, 1.1, 0.3, use_ghost=False)(p, {}, {}, batches, steps, 5)
    pre = dp_local_training(m, sgd(0.1), 1.0, 1.1, 0.3)(p, {}, {}, dp_inputs(batches, p, 5), steps, 5)
    for k in p:
        torch.testing.assert_close(fast.delta[k], slow.delta[k], rtol=0, atol=1e-10)
        assert torch.equal(fast.delta[k], pre.delta[k])
    assert float(fast.metrics["samples"]) == float(batches["mask"].sum())


def test_noise_is_multiplier_times_clip_over_expected_batch():
    """One SGD step: delta(noisy) - delta(noise-free) = -lr * sigma * C * z / (q * n)."""
    m, lr, clip, sigma, q = _mlp(), 0.1, 0.7, 1.3, 0.25
    p = _params(m)
    x, y = _client_data(4, n=20)
    batches = dp_inputs(poisson_batches(x, y, 1, q, key=3), p, key=9)
    one = torch.ones(1, dtype=torch.bool)
    noisy = dp_local_training(m, sgd(lr), clip, sigma, q)(p, {}, {}, batches, one, 9)
    quiet = dp_local_training(m, sgd(lr), clip, 0.0, q)(p, {}, {}, batches, one, 9)
    for k in p:
        expect = -lr * sigma * clip * batches["noise/" + k][0] / (q * 20)
        torch.testing.assert_close(noisy.delta[k] - quiet.delta[k], expect, rtol=1e-9, atol=1e-12)
    z = torch.cat([batches["noise/" + k].reshape(-1) for k in p])
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05


def test_clipped_sum_has_at_most_clip_per_sample():
    m, clip = _mlp(), 0.01
    p = _params(m)
    x, y = _client_data(5)
    batches = {"x": 100 * x[None], "y": y[None], "mask": torch.ones(1, 24, dtype=torch.bool),
               "records": torch.tensor([24.0])}
    res = dp_local_training(m, sgd(1.0), clip, 0.0, 1.0)(p, {}, {}, batches, torch.ones(1, dtype=torch.bool), 1)
    total = torch.sqrt(sum((v * 24) .pow(2).sum() for v in res.delta.values()))  # |sum of clipped|
    assert float(total) <= 24 * clip * (1 + 1e-9)
    g = G.per_sample_grads(m, p, 100 * x, y)
    assert float(G.norms_of(g).min()) > clip  # every sample was actually clipped


def test_poisson_batches_are_bernoulli_q_and_poisson_u_selects_in_place():
    x, y = _client_data(6, n=400)
    b = poisson_batches(x, y, steps=50, q=0.1, key=1)
    assert b["mask"].sum(1).float().mean().item() == pytest.approx(40, rel=0.1)
    assert torch.equal(b["records"], torch.full((50,), 400.0, dtype=torch.float64))
    full = {"x": x.expand(50, -1, -1), "y": y.expand(50, -1), "mask": torch.ones(50, 400, dtype=torch.bool)}
    sel = dp_inputs(full, {}, key=2, poisson=True)["poisson_u"] < 0.1
    assert sel.float().mean().item() == pytest.approx(0.1, rel=0.1)


def test_vmap_over_clients_of_vmap_over_samples_equals_loop():
    m = _mlp()
    p = _params(m)
    steps = torch.ones(3, dtype=torch.bool)
    keys = [21, 22, 23]
    raw = [poisson_batches(*_client_data(10 + i), 3, 0.3, key=k) for i, k in enumerate(keys)]
    cap = max(b["x"].shape[1] for b in raw)
    padded = [_pad(b, cap) for b in raw]
    for use_ghost in (True, False):
        update = dp_local_training(m, sgd(0.1), 1.0, 1.0, 0.3, use_ghost=use_ghost)
        loop = [update(p, {}, {}, b, steps, k) for b, k in zip(padded, keys)]
        stacked = {n: torch.stack([dp_inputs(b, p, k)[n] for b, k in zip(padded, keys)])
                   for n in dp_inputs(padded[0], p, 0)}
        delta = vmap(lambda b, k: update(p, {}, {}, b, steps, k).delta)(stacked, torch.tensor(keys))
        for i in range(3):
            for n in p:
                torch.testing.assert_close(delta[n][i], loop[i].delta[n], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="dp_inputs"):
        vmap(lambda b, k: update(p, {}, {}, b, steps, k).delta)(
            {n: torch.stack([b[n] for b in padded]) for n in padded[0]}, torch.tensor(keys))


def _pad(b, cap):
    out = dict(b)
    for n in ("x", "y", "mask"):
        v = b[n]
        out[n] = torch.cat([v, torch.zeros((v.shape[0], cap - v.shape[1], *v.shape[2:]), dtype=v.dtype)], 1)
    return out


def test_step_event_is_poisson_gaussian():
    from tests.privacy.test_privacy_run import build

    alg = build(["privacy.mode=dp_sgd", "privacy.sample_rate=0.01", "privacy.noise_multiplier=1.1"])[0]
    assert alg.estimator.event == P.poisson_gaussian(0.01, 1.1)
