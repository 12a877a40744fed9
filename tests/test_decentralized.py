"""Decentralized training: exact averages on every topology, and D-PSGD against FedAvg."""
import numpy as np
import pytest
import torch

from atoll import config, decentralized as D
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate


def values(n, d=5, seed=0):
    return torch.tensor(np.random.default_rng(seed).normal(size=(n, d)) * 100)


@pytest.mark.parametrize("w", [D.ring(16), D.torus(4, 4), D.random_regular(16, 4, seed=1)],
                         ids=["ring", "torus", "random_regular"])
def test_undirected_gossip_is_doubly_stochastic_and_reaches_the_average(w):
    ones = torch.ones(16, dtype=torch.float64)
    torch.testing.assert_close(w @ ones, ones, rtol=0, atol=1e-12)
    torch.testing.assert_close(ones @ w, ones, rtol=0, atol=1e-12)
    x = values(16)
    out = D.gossip(x, D.static(w), 3000)
    torch.testing.assert_close(out, x.mean(0).expand_as(out), rtol=1e-9, atol=1e-9 * float(x.abs().max()))


def test_push_sum_reaches_the_exact_average_on_a_directed_ring():
    x = values(16, seed=1)
    out = D.push_sum(x, D.static(D.directed_ring(16)), 2000)
    assert float((out - x.mean(0)).abs().max()) <= 1e-9 * float(x.abs().max())


def test_push_sum_corrects_what_plain_gossip_gets_wrong_on_an_unbalanced_digraph():
    n, g = 12, np.random.default_rng(3)
    p = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n):  # node j splits among itself, j + 1 and (for some nodes) a random other
        outs = {j, (j + 1) % n} | ({int(g.integers(n))} if j % 3 == 0 else set())
        for i in outs:
            p[i, j] = 1.0 / len(outs)
    x = values(n, seed=2)
    wrong = D.gossip(x, D.static(p), 2000)
    right = D.push_sum(x, D.static(p), 2000)
    assert float((wrong - x.mean(0)).abs().max()) > 1e-2  # column-stochastic only: biased
    assert float((right - x.mean(0)).abs().max()) <= 1e-9 * float(x.abs().max())


def test_time_varying_exponential_graph_averages_exactly_in_log_n_rounds():
    x = values(16, seed=4)
    out = D.push_sum(x, D.exponential(16), 4)  # 4 = log2(16) one-peer rounds
    assert float((out - x.mean(0)).abs().max()) <= 1e-12 * float(x.abs().max())


def test_dpsgd_on_a_complete_graph_keeps_every_node_equal_and_learns():
    cfg = config.load(text=BASE.format(rounds=1))
    _, model, fed, _ = config.build(cfg)
    seen = []
    full = D.static(torch.full((16, 16), 1 / 16, dtype=torch.float64))
    D.dpsgd(model, fed, full, 30, lr=0.3, eval_every=30,
            on_eval=lambda r, p: seen.append(torch.func.functional_call(model, p, (fed.x_test,))))
    acc = float((seen[0].argmax(1) == fed.y_test).double().mean())
    assert acc > 0.6  # 30 averaged steps from 10% at the start


def test_degrees_and_bytes():
    assert D.out_degree(D.ring(16)).tolist() == [2] * 16
    assert D.out_degree(D.torus(4, 4)).tolist() == [4] * 16
    assert D.out_degree(D.random_regular(16, 4)).tolist() == [4] * 16
    assert D.out_degree(D.directed_ring(16)).tolist() == [1] * 16


BASE = """
seed = 0
rounds = {rounds}
dtype = "float64"
[data]
name = "digits"
num_clients = 16
client_test_fraction = 0.0
[model]
name = "mlp"
hidden = [32]
[client]
lr = 0.1
batch_size = 32
steps = 1
[eval]
federated = false
"""


@pytest.mark.slow
def test_a_16_node_ring_reaches_fedavg_accuracy_within_2_points_in_twice_the_rounds(tmp_path):
    rounds = 150
    cfg = config.load(text=BASE.format(rounds=rounds))
    alg, model, fed, plan = config.build(cfg)
    fedavg = simulate(alg, model, fed, plan, runtime=VmapRuntime(), run_dir=tmp_path, plots=False)
    params = D.dpsgd(model, fed, D.static(D.ring(16)), 2 * rounds, lr=0.1, batch_size=32, seed=0)
    logits = torch.func.functional_call(model, params, (fed.x_test,))
    acc = float((logits.argmax(1) == fed.y_test).double().mean())
    print(f"D-PSGD ring {acc:.4f} after {2 * rounds} rounds, FedAvg {fedavg.final['test_acc']:.4f} after {rounds}")
    assert acc >= fedavg.final["test_acc"] - 0.02, (acc, fedavg.final["test_acc"])


def byzantine_gossip(x0, w, rounds, liar, value, b):
    """Gossip where node ``liar`` holds ``value`` before every exchange (it sends it each round)."""
    x = x0.clone()
    for _ in range(rounds):
        x[liar] = value
        x = D.gossip(x, D.static(w), 1, byzantine=b)
    return x


def test_clipped_gossip_contains_a_byzantine_node_that_plain_gossip_follows():
    n, w = 16, D.random_regular(16, 4, seed=1)
    x0 = torch.tensor(np.random.default_rng(0).normal(size=(n, 5)))
    honest = [i for i in range(n) if i != 3]
    centre = x0[honest].mean(0)
    plain = byzantine_gossip(x0, w, 100, 3, 1e6, None)
    clipped = byzantine_gossip(x0, w, 100, 3, 1e6, 1)
    assert float((plain[honest] - centre).norm(dim=1).min()) > 1e5   # the attack works on gossip
    assert float((clipped[honest] - centre).norm(dim=1).max()) < 1.0  # honest spread at the start: ~2
    spread = (clipped[honest] - clipped[honest].mean(0)).norm(dim=1).max()
    assert float(spread) < 0.1 * float((x0[honest] - centre).norm(dim=1).max())  # they still agree


def test_clipped_gossip_with_b_0_is_gossip_and_clip_factors_follow_their_definition():
    w, x = D.torus(4, 4), values(16, seed=5)
    assert torch.equal(D.gossip(x, D.static(w), 20, byzantine=0), D.gossip(x, D.static(w), 20))
    d = torch.tensor([3.0, 1.0, 5.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(D.clip_factors(d, 1), torch.tensor([1.0, 1.0, 0.6, 1.0], dtype=torch.float64))
    torch.testing.assert_close(D.clip_factors(d, 2), torch.tensor([2 / 3, 1.0, 0.4, 1.0], dtype=torch.float64))
    assert torch.equal(D.clip_factors(d, 4), torch.zeros(4, dtype=torch.float64))  # all may lie
    a = D.clipped(w, {"x": x}, 1)  # rows stay stochastic, entries non-negative
    torch.testing.assert_close(a.sum(1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(a.min()) >= 0.0 and not torch.equal(a, w)
    for bad in (-1, 1.5, "1"):
        with pytest.raises(ValueError, match="byzantine"):
            D.clip_factors(d, bad)


def test_dpsgd_with_clipped_gossip_still_learns_and_refuses_push_sum():
    cfg = config.load(text=BASE.format(rounds=1))
    _, model, fed, _ = config.build(cfg)
    with pytest.raises(ValueError, match="push-sum"):
        D.dpsgd(model, fed, D.static(D.ring(16)), 1, push=True, byzantine=1)
    seen = []
    D.dpsgd(model, fed, D.static(D.random_regular(16, 4, seed=2)), 30, lr=0.3, byzantine=1,
            eval_every=30, on_eval=lambda r, p: seen.append(torch.func.functional_call(model, p, (fed.x_test,))))
    assert float((seen[0].argmax(1) == fed.y_test).double().mean()) > 0.6
