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
