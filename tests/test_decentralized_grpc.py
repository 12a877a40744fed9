"""Peers over gRPC with TLS (atoll.peers): equal to the simulation, exact push-sum, hostile
messages refused with their reason, neighbours that vanish or stay silent. Loopback only."""
import time

import numpy as np
import pytest
import torch

from atoll import config, decentralized as D, peers
from atoll.peers.inbox import WEIGHT
from atoll.transport import wire
from atoll.transport.grpc.peer import PeerChannel, PeerChunk, TransportError

EPS = torch.finfo(torch.float64).eps


def values(n, d=64, seed=0):
    return torch.tensor(np.random.default_rng(seed).normal(size=(n, d)) * 100)


@pytest.fixture(scope="module")
def creds8(tmp_path_factory):
    return peers.enrol(tmp_path_factory.mktemp("certs8"), 8)


@pytest.fixture(scope="module")
def creds4(tmp_path_factory):
    return peers.enrol(tmp_path_factory.mktemp("certs4"), 4)


def run_peers(x, topology, rounds, creds, **kw):
    out, ps = peers.run([{"x": x[i]} for i in range(len(x))], topology, rounds, creds=creds, **kw)
    return torch.stack([o["x"] for o in out]), ps


def bound(rounds, w, x):
    """Rounding of ``rounds`` row-stochastic mixes summed in another order than the simulation's
    matmul: each round's row sum of deg + 1 terms is off by at most (deg + 1) eps max|x| (the
    values never leave [min x0, max x0]) and W does not amplify earlier errors (rows: convex)."""
    deg = int(D.out_degree(w).max())
    return rounds * (deg + 1) * EPS * float(x.abs().max())


@pytest.mark.parametrize("w", [D.ring(8), D.torus(2, 4), D.random_regular(8, 4, seed=1)],
                         ids=["ring", "torus", "random_regular"])
def test_gossip_over_grpc_equals_the_simulation(w, creds8):
    x, rounds = values(8), 12
    got, ps = run_peers(x, D.static(w), rounds, creds8)
    ref = D.gossip(x, D.static(w), rounds)
    assert float((got - x).abs().max()) > 1.0  # it mixed
    assert float((got - ref).abs().max()) <= bound(rounds, w, x)
    deg = D.out_degree(w).tolist()
    for i, p in enumerate(ps):  # O(degree x d) bytes: deg messages of d float64 and a header
        assert p.sent == [deg[i] * len(wire.dumps({"x": x[i]}))] * rounds
        assert not p.inbox.refused and not any(p.missing)


@pytest.mark.parametrize("topology", [D.static(D.directed_ring(8)), D.exponential(8)],
                         ids=["directed_ring", "exponential"])
def test_push_sum_over_grpc_is_the_simulation_bit_for_bit(topology, creds8):
    # weights 1/2 make every product exact and every row sums two terms: one rounding, any order
    x = values(8, seed=1)
    got, _ = run_peers(x, topology, 10, creds8, push=True)
    assert torch.equal(got, D.push_sum(x, topology, 10))


def test_push_sum_over_grpc_reaches_the_exact_average_on_a_directed_ring(creds8):
    x = values(8, d=16, seed=2)
    got, _ = run_peers(x, D.static(D.directed_ring(8)), 300, creds8, push=True)
    assert float((got - x.mean(0)).abs().max()) <= 1e-9 * float(x.abs().max())


DIGITS = """
seed = 0
rounds = 1
dtype = "float64"
[data]
name = "digits"
num_clients = 4
client_test_fraction = 0.0
[model]
name = "mlp"
hidden = [8]
"""


@pytest.mark.parametrize("push", [False, True], ids=["dpsgd_ring", "sgp_directed_ring"])
def test_dpsgd_over_grpc_equals_the_simulation(push, creds4):
    _, model, fed, _ = config.build(config.load(text=DIGITS))
    w = D.directed_ring(4) if push else D.ring(4)
    kw = dict(lr=0.1, batch_size=16, local_steps=2, seed=3, push=push)
    ref = D.dpsgd(model, fed, D.static(w), 4, **kw)
    start = {k: v.detach() for k, v in model.named_parameters()}
    out, _ = peers.run([start] * 4, D.static(w), 4, creds=creds4, push=push,
                       local=[peers.dpsgd_step(model, fed, i, **kw) for i in range(4)])
    for k, v in ref.items():
        got = torch.stack([o[k] for o in out]).mean(0)
        assert float((v - start[k]).abs().max()) > 1e-3  # it trained
        # the peers' per-node autograd and the simulation's vmap sum in other orders: float64
        # rounding, a few ulps of the weights per step
        torch.testing.assert_close(got, v, rtol=1e-12, atol=1e-12 * float(v.abs().max()))
