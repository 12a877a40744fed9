"""Ditto, FedPer and FedRep on quadratic clients whose personalized optima are known in closed
form (quadratic.py: f_i(w) = 1/2 (w - a_i)^T diag(A_i) (w - a_i), very different local step
counts), the head that never leaves its client, and reproducibility."""
import pytest
import torch

from atoll import algorithms as A
from atoll import tree as T
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.round import broadcast_bytes, client_round
from atoll.runtime.vmap import VmapRuntime
from atoll.transport import wire
from atoll.transforms import sgd

from . import quadratic as q

LR = 0.3
D = q.D


def two_part_loss(params, x, y, mask):
    """f_i(body) + f_i(head): body and head each see client i's quadratic."""
    return q.loss_fn({"w": params["body"]}, x, y, mask) + q.loss_fn({"w": params["head.w"]}, x, y, mask)


def zeros(*names):
    return {k: torch.zeros(D, dtype=torch.float64) for k in names}


def train(algorithm, loss_fn, init, rounds, runtime=None, d=None, steps=q.STEPS):
    runtime, d = runtime or LoopRuntime(), d or q.data()
    state, update, cstates = algorithm.init(init), algorithm.client(loss_fn), {}
    for _ in range(rounds):
        state, cstates, stats = runtime.run_round(algorithm, update, state, cstates,
                                                  list(range(len(d.clients))), d, q.work(steps), 0)
        assert stats.succeeded == len(d.clients), stats.failures
    return state, cstates


def dist(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("lam", [0.0, 0.5, 4.0])
def test_ditto_reaches_the_closed_form_personal_optimum(lam):
    """v_i* = argmin f_i(v) + lam/2 ||v - w*||^2 = (A_i a_i + lam w*) / (A_i + lam), w* FedAvg's
    fixed point."""
    state, cstates = train(A.ditto(sgd(LR), lam=lam), q.loss_fn, zeros("w"), 200)
    w = q.fedavg_fixed_point(LR)
    assert dist(state.params["w"], w) < 1e-9  # the global model is FedAvg's
    want = (q.A * q.MINIMA + lam * w) / (q.A + lam)
    for i in range(len(q.A)):
        assert dist(cstates[i]["personal"]["w"], want[i]) < 1e-6
    assert dist(want[0], want[1]) > 0.5  # personal models really differ


def test_ditto_isotropic_case_of_the_issue():
    """f_i = 1/2 ||v - a_i||^2, equal steps: w* = mean a_i and v_i* = (a_i + lam w*) / (1 + lam)."""
    lam, d = 0.7, q.data()
    for c in d.clients:
        c.x[:, :D] = 1.0
    state, cstates = train(A.ditto(sgd(LR), lam=lam), q.loss_fn, zeros("w"), 200, d=d, steps=[3] * 4)
    w_star = (torch.tensor(q.SAMPLES, dtype=torch.float64)[:, None] * q.MINIMA).sum(0) / sum(q.SAMPLES)
    assert dist(state.params["w"], w_star) < 1e-9
    for i in range(4):
        assert dist(cstates[i]["personal"]["w"], (q.MINIMA[i] + lam * w_star) / (1 + lam)) < 1e-6


@pytest.mark.parametrize("make", [lambda: A.fedper(sgd(LR)), lambda: A.fedrep(sgd(LR), head_epochs=2)],
                         ids=["fedper", "fedrep"])
def test_local_head_reaches_each_clients_optimum_and_the_body_fedavgs(make):
    state, cstates = train(make(), two_part_loss, zeros("body", "head.w"), 200)
    assert dist(state.params["body"], q.fedavg_fixed_point(LR)) < 1e-9
    for i in range(len(q.A)):
        assert dist(cstates[i]["head"]["head.w"], q.MINIMA[i]) < 1e-6
    assert torch.equal(state.params["head.w"], zeros("h")["h"])  # the server's head never moved


@pytest.mark.parametrize("name", ["fedper", "fedrep"])
def test_the_head_never_leaves_the_client(name):
    """The bytes a client sends carry exact zeros for the head, whatever its head is; the body's
    delta is there and non-zero."""
    alg = getattr(A, name)(sgd(LR))
    state = alg.init(zeros("body", "head.w"))
    down = broadcast_bytes(alg, state, 0, 1)
    mine = torch.tensor([5.0, -7.0, 9.0], dtype=torch.float64)
    cstate = {**alg.new_client_state(state.params), "head": {"head.w": mine}}
    message, new, _, _ = client_round(alg, alg.client(two_part_loss), down, cstate,
                                      q.data().clients[2], 2, 1, q.work(), 0)
    sent = T.split(wire.loads(message))["delta"]
    assert torch.equal(sent["head.w"], torch.zeros(D, dtype=torch.float64))
    assert float(sent["body"].abs().max()) > 0.1
    assert dist(new["head"]["head.w"], mine) > 0.1  # the head did train


def test_fedrep_trains_the_head_first_with_the_body_frozen():
    """Round 1: the head runs K_i exact steps from 0 on the received body, then the body K_i
    steps with that head fixed (separable f_i: each has its closed form)."""
    state, cstates = train(A.fedrep(sgd(LR), head_epochs=2), two_part_loss, zeros("body", "head.w"), 1)
    p = q.weights()[:, None]
    k = torch.tensor(q.STEPS, dtype=torch.float64)[:, None]
    head = q.MINIMA * (1 - (1 - LR * q.A) ** (2 * k))  # two passes of K_i steps
    body = (p * q.MINIMA * (1 - (1 - LR * q.A) ** k)).sum(0)
    for i in range(4):
        assert dist(cstates[i]["head"]["head.w"], head[i]) < 1e-12
    assert dist(state.params["body"], body) < 1e-12


def test_head_prefix_must_select_part_of_the_model():
    with pytest.raises(ValueError, match="some but not all"):
        A.fedper(sgd(LR), head="nothing").new_client_state(zeros("body", "head.w"))
    with pytest.raises(ValueError, match="some but not all"):  # logreg: the last layer is all of it
        A.fedper(sgd(LR)).new_client_state({"weight": torch.zeros(2), "bias": torch.zeros(1)})


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [x for t in tree for x in _leaves(t)]
    return [tree]


@pytest.mark.parametrize("name", ["ditto", "fedper", "fedrep"])
def test_same_seed_same_run_and_vmap_matches_loop(name):
    loss, init = (q.loss_fn, zeros("w")) if name == "ditto" else (two_part_loss, zeros("body", "head.w"))
    runs = [train(getattr(A, name)(sgd(LR)), loss, init, 5, rt)
            for rt in (LoopRuntime(), LoopRuntime(), VmapRuntime())]
    (s0, c0), (s1, c1), (s2, c2) = runs
    for a, b, c in zip(_leaves(s0.params), _leaves(s1.params), _leaves(s2.params)):
        assert torch.equal(a, b) and dist(a, c) < 1e-12
    for i in c0:
        stacked = c2.get([i])
        for a, b, c in zip(_leaves(c0[i]), _leaves(c1[i]), _leaves(stacked)):
            c = c[0]
            assert torch.equal(a, b) and dist(a, c) < 1e-12


def test_lg_fedavg_shares_the_head_and_keeps_the_body():
    state, cstates = train(A.lg_fedavg(sgd(LR)), two_part_loss, zeros("body", "head.w"), 200)
    assert dist(state.params["head.w"], q.fedavg_fixed_point(LR)) < 1e-9
    for i in range(len(q.A)):
        assert dist(cstates[i]["head"]["body"], q.MINIMA[i]) < 1e-6
    assert torch.equal(state.params["body"], zeros("b")["b"])


def test_ditto_client_joining_late_starts_from_the_global_model_it_receives():
    """Clients 2 and 3 first train in round 4: v starts from round 4's global model in both the
    loop runtime (state made on arrival) and the vectorised one (a store template made at
    round 1), and the two agree."""
    cohorts = [[0, 1]] * 3 + [[0, 1, 2, 3]]
    ends = []
    for runtime in (LoopRuntime(), VmapRuntime()):
        alg, d = A.ditto(sgd(LR), lam=0.5), q.data()
        state, update, cstates = alg.init(zeros("w")), alg.client(q.loss_fn), {}
        for cohort in cohorts:
            before = state.params["w"]
            state, cstates, _ = runtime.run_round(alg, update, state, cstates, cohort, d, q.work(), 0)
        ends.append((before, cstates))
    (w3, loop), (_, vec) = ends
    stacked = vec.get([2, 3])["personal"]["w"]
    for j, i in enumerate((2, 3)):
        assert dist(loop[i]["personal"]["w"], stacked[j]) < 1e-12
    # one more check against the closed form of round 4 for client 2 (K_2 = 12 steps from w3)
    a, m, k, lam = q.A[2], q.MINIMA[2], q.STEPS[2], 0.5
    fix = (a * m + lam * w3) / (a + lam)
    assert dist(loop[2]["personal"]["w"], fix + (1 - LR * (a + lam)) ** k * (w3 - fix)) < 1e-12


def test_apfl_personal_model_reaches_each_clients_optimum_and_w_fedavgs():
    """One local step per round: v and alpha stop where grad f_i(alpha v + (1 - alpha) w) = 0,
    i.e. the personalized model is the client's own optimum a_i."""
    alg = A.apfl(sgd(LR), alpha=0.5)
    state, cstates = train(alg, q.loss_fn, zeros("w"), 600, steps=[1] * 4)
    assert dist(state.params["w"], q.fedavg_fixed_point(LR, [1] * 4)) < 1e-9
    for i in range(len(q.A)):
        assert 0.0 < float(cstates[i]["alpha"]) <= 1.0
        assert dist(alg.personalize(state.params, cstates[i])["w"], q.MINIMA[i]) < 1e-6


def test_apfl_loop_and_vmap_agree():
    runs = [train(A.apfl(sgd(0.1)), q.loss_fn, zeros("w"), 4, rt) for rt in (LoopRuntime(), VmapRuntime())]
    (s0, c0), (s1, c1) = runs
    assert dist(s0.params["w"], s1.params["w"]) < 1e-12
    for i in c0:
        got = c1.get([i])
        assert dist(c0[i]["v"]["w"], got["v"]["w"][0]) < 1e-12
        assert dist(c0[i]["alpha"], got["alpha"][0]) < 1e-12
