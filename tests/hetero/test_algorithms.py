"""FedNova, SCAFFOLD and FedaGrac on quadratic clients whose optima are known in closed form,
against slow reference implementations, and vectorised against the loop runtime."""
import pytest
import torch

from atoll import algorithms as A
from atoll.runtime.vmap import VmapRuntime
from atoll.transforms import sgd

from . import quadratic as q

LR = 0.1


def dist(w, target):
    return float((w - target).abs().max())


def test_fedavg_converges_to_a_biased_point():
    state, _ = q.train(A.fedavg(sgd(LR)), 60)
    w = state.params["w"]
    assert dist(w, q.fedavg_fixed_point(LR)) < 1e-9
    assert dist(w, q.optimum()) > 0.5  # heterogeneous step counts optimise the wrong objective


@pytest.mark.parametrize("make", [
    lambda: A.scaffold(sgd(LR), local_lr=LR, num_clients=4),
    lambda: A.fedagrac(sgd(LR), local_lr=LR, form="seed"),            # lam = 0.1
    lambda: A.fedagrac(sgd(LR), local_lr=LR, form="published", lam=1.0),
], ids=["scaffold", "fedagrac-seed", "fedagrac-published-lam1"])
def test_corrected_algorithms_reach_the_true_optimum(make):
    state, _ = q.train(make(), 100)
    assert dist(state.params["w"], q.optimum()) < 1e-6


def test_fedagrac_published_lambda_below_one_leaves_part_of_the_bias():
    """A client's corrected steps sum to ``K_i ((1 - lam) mu_i + lam v)``, so only ``lam = 1``
    makes the optimum a fixed point; smaller ``lam`` stops between FedAvg's point and it."""
    far = dist(q.fedavg_fixed_point(LR), q.optimum())
    ends = [dist(q.train(A.fedagrac(sgd(LR), local_lr=LR, form="published", lam=lam), 100)[0]
                 .params["w"], q.optimum()) for lam in (0.03, 0.1, 0.3)]
    assert far > ends[0] > ends[1] > ends[2] > 0.3


def test_fednova_reaches_its_closed_form_fixed_point():
    state, _ = q.train(A.fednova(sgd(LR)), 60)
    w = state.params["w"]
    assert dist(w, q.fednova_fixed_point(LR)) < 1e-9
    assert dist(w, q.optimum()) < 0.5 * dist(q.fedavg_fixed_point(LR), q.optimum())


def test_fednova_consistent_as_local_lr_vanishes_fedavg_not():
    """FedNova's fixed point moves by O(lr) (4.4 lr here); FedAvg's stays K-weighted."""
    lr = 1e-8
    tau_eff = float((q.weights() * torch.tensor(q.STEPS, dtype=torch.float64)).sum())
    server_lr = 0.8 / (tau_eff * lr)  # an O(1) global step despite the tiny local one
    nova, _ = q.train(A.fednova(sgd(lr), server_lr=server_lr), 40)
    avg, _ = q.train(A.fedavg(sgd(lr), server_lr=server_lr), 40)
    assert dist(nova.params["w"], q.optimum()) < 1e-6
    assert dist(avg.params["w"], q.optimum()) > 0.5
    for small in (1e-3, 1e-5):
        assert dist(q.fednova_fixed_point(small), q.optimum()) < 5 * small


@pytest.mark.parametrize("steps", [q.STEPS, [7, 7, 7, 7]], ids=["unequal", "equal"])
def test_fedagrac_published_lambda_zero_is_fedavg(steps):
    a, _ = q.train(A.fedagrac(sgd(LR), local_lr=LR, form="published", lam=0.0), 5, steps=steps)
    b, _ = q.train(A.fedavg(sgd(LR)), 5, steps=steps)
    assert torch.equal(a.params["w"], b.params["w"])


def _grad(w, i):
    return q.A[i] * (w - q.MINIMA[i])


def _weights(cohort):
    n = torch.tensor([q.SAMPLES[i] for i in cohort], dtype=torch.float64)
    return n / n.sum()


COHORTS = [[0, 1, 2, 3], [1, 3], [0, 2, 3], [0, 1, 2, 3], [2], [0, 1, 3]]


def _run_cohorts(algorithm, runtime=None):
    from atoll.runtime.loop import LoopRuntime

    runtime = runtime or LoopRuntime()
    d = q.data()
    state = algorithm.init({"w": torch.zeros(q.D, dtype=torch.float64)})
    update, cstates = algorithm.client(q.loss_fn), {}
    for cohort in COHORTS:
        state, cstates, _ = runtime.run_round(algorithm, update, state, cstates, cohort, d, q.work(), 0)
    return state, cstates


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5])
def test_fedagrac_seed_form_matches_reference(lam):
    """Seed 003 step by step in plain loops, partial participation (x_prev from earlier rounds)."""
    x, v = torch.zeros(q.D, dtype=torch.float64), torch.zeros(q.D, dtype=torch.float64)
    prev = {}
    for cohort in COHORTS:
        finals, grads = [], []
        for i in cohort:
            k = q.STEPS[i]
            v_i = _grad(x, i)
            c = v - v_i + (lam / (LR * k) * (x - prev[i]) if i in prev else 0)
            y = x.clone()
            for _ in range(k):
                y = y - LR * (_grad(y, i) + c)
            prev[i] = y
            finals.append(y)
            grads.append(v_i)
        w = _weights(cohort)
        x = sum(wi * f for wi, f in zip(w, finals))
        v = sum(wi * g for wi, g in zip(w, grads))
    state, cstates = _run_cohorts(A.fedagrac(sgd(LR), local_lr=LR, lam=lam))
    assert dist(state.params["w"], x) < 1e-12
    assert dist(state.extra["broadcast"]["vtilde"]["w"], v) < 1e-12
    for i, y in prev.items():
        assert dist(cstates[i]["x_prev"]["w"], y) < 1e-12 and float(cstates[i]["seen"]) == 1.0


@pytest.mark.parametrize("lam", [0.03, 0.5])
def test_fedagrac_published_form_matches_the_authors_rule(lam):
    """HarliWu/FedaGrac, re-derived in plain loops with partial participation: every local step
    is ``x <- x - lr (g + lam (v - mu_i))``, ``mu_i`` the mean of client i's local gradients in
    its previous participation (0 before); ``v`` <- the weighted sum over the cohort of ``mu_i``
    (this round's) where ``K_i`` <= the cohort's weighted mean K, else of the first gradient."""
    x, v = torch.zeros(q.D, dtype=torch.float64), torch.zeros(q.D, dtype=torch.float64)
    mu = {i: torch.zeros(q.D, dtype=torch.float64) for i in range(4)}
    for cohort in COHORTS:
        finals, picks = [], []
        w = _weights(cohort)
        mean_k = sum(wi * q.STEPS[i] for wi, i in zip(w, cohort))
        for i in cohort:
            k, y, grads = q.STEPS[i], x.clone(), []
            for _ in range(k):
                grads.append(_grad(y, i))
                y = y - LR * (grads[-1] + lam * (v - mu[i]))
            mu[i] = sum(grads) / k
            finals.append(y)
            picks.append(mu[i] if k <= mean_k else grads[0])
        x = sum(wi * f for wi, f in zip(w, finals))
        v = sum(wi * g for wi, g in zip(w, picks))
    state, cstates = _run_cohorts(A.fedagrac(sgd(LR), local_lr=LR, lam=lam, form="published"))
    assert dist(state.params["w"], x) < 1e-12
    assert dist(state.extra["broadcast"]["vtilde"]["w"], v) < 1e-12
    for i in range(4):
        assert dist(cstates[i]["mu"]["w"], mu[i]) < 1e-12


def test_fedagrac_published_default_lambda_is_the_authors():
    """``--lam`` defaults to 0.03 in the authors' add_parser_arguments.py (atoll had 1)."""
    default, _ = _run_cohorts(A.fedagrac(sgd(LR), local_lr=LR, form="published"))
    lam003, _ = _run_cohorts(A.fedagrac(sgd(LR), local_lr=LR, form="published", lam=0.03))
    lam1, _ = _run_cohorts(A.fedagrac(sgd(LR), local_lr=LR, form="published", lam=1.0))
    assert torch.equal(default.params["w"], lam003.params["w"])
    assert dist(default.params["w"], lam1.params["w"]) > 1e-3


def test_scaffold_matches_reference():
    """Option II with partial participation, c <- c + |S|/N mean(dc_i)."""
    x, c = torch.zeros(q.D, dtype=torch.float64), torch.zeros(q.D, dtype=torch.float64)
    ci = {i: torch.zeros(q.D, dtype=torch.float64) for i in range(4)}
    for cohort in COHORTS:
        deltas, dcs = [], []
        for i in cohort:
            k, y = q.STEPS[i], x.clone()
            for _ in range(k):
                y = y - LR * (_grad(y, i) - ci[i] + c)
            new = ci[i] - c + (x - y) / (k * LR)
            deltas.append(y - x)
            dcs.append(new - ci[i])
            ci[i] = new
        w = _weights(cohort)
        x = x + sum(wi * d for wi, d in zip(w, deltas))
        c = c + len(cohort) / 4 * sum(wi * d for wi, d in zip(w, dcs))
    state, cstates = _run_cohorts(A.scaffold(sgd(LR), local_lr=LR, num_clients=4))
    assert dist(state.params["w"], x) < 1e-12
    assert dist(state.extra["broadcast"]["c"]["w"], c) < 1e-12
    assert all(dist(cstates[i]["c_i"]["w"], ci[i]) < 1e-12 for i in range(4))


def test_fednova_matches_reference():
    x = torch.zeros(q.D, dtype=torch.float64)
    for cohort in COHORTS:
        ds = []
        for i in cohort:
            y = x.clone()
            for _ in range(q.STEPS[i]):
                y = y - LR * _grad(y, i)
            ds.append((y - x) / q.STEPS[i])
        w = _weights(cohort)
        tau = sum(wi * q.STEPS[i] for wi, i in zip(w, cohort))
        x = x + tau * sum(wi * d for wi, d in zip(w, ds))
    state, _ = _run_cohorts(A.fednova(sgd(LR)))
    assert dist(state.params["w"], x) < 1e-12


@pytest.mark.parametrize("make", [
    lambda: A.fednova(sgd(LR)), lambda: A.scaffold(sgd(LR), local_lr=LR, num_clients=4),
    lambda: A.fedagrac(sgd(LR), local_lr=LR), lambda: A.fedagrac(sgd(LR), local_lr=LR, form="published"),
], ids=["fednova", "scaffold", "fedagrac-seed", "fedagrac-published"])
def test_vmap_equals_loop_on_quadratics(make):
    loop, lstates = _run_cohorts(make())
    vec, vstates = _run_cohorts(make(), VmapRuntime(chunk_clients=2))
    assert dist(loop.params["w"], vec.params["w"]) < 1e-12
    from atoll.runtime.vmap import load_states  # the vectorised runtime keeps a ClientStore

    for i in lstates:
        vstate = load_states(vstates, [i])[0]
        for k, v in lstates[i].items():
            if k != "uplink":
                for leaf_l, leaf_v in zip(torch.utils._pytree.tree_leaves(v), torch.utils._pytree.tree_leaves(vstate[k])):
                    assert float((leaf_l - leaf_v).abs().max()) < 1e-12


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="num_clients"):
        A.scaffold(sgd(LR))
    with pytest.raises(ValueError, match="form"):
        A.fedagrac(form="patent")
    with pytest.raises(ValueError, match="lam"):
        A.fedagrac(lam=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        A.fednova(momentum=1.0)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_fednova_momentum_normaliser_is_the_gradient_weight(rho):
    """With a constant gradient g, K momentum-SGD steps move by -lr * ||a||_1 * g exactly."""
    from atoll.algorithms.fednova import _norm_a

    opt, g = sgd(0.1, momentum=rho), {"w": torch.tensor([1.0], dtype=torch.float64)}
    p, s = {"w": torch.zeros(1, dtype=torch.float64)}, None
    s = opt.init(p)
    for _ in range(13):
        u, s = opt.update(g, s, p, {})
        p = {"w": p["w"] + u["w"]}
    assert float(p["w"]) == pytest.approx(-0.1 * _norm_a(torch.tensor(13.0, dtype=torch.float64), rho).item(), rel=1e-12)
