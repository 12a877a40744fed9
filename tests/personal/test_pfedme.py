"""pFedMe on least-squares clients (quadratic_ls.py) whose Moreau-envelope fixed point is known
in closed form, loop == vmap, and the client state it keeps."""
import pytest
import torch

from atoll import algorithms as A
from atoll.client import model_loss
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.transforms import sgd

import quadratic_ls as q

LAM, ETA, NU = 2.0, 0.3, 0.3  # lambda, the local (outer) lr, the personal problem's lr


def closed_form(steps):
    """The envelope F_i(w) = min_theta f_i(theta) + lam/2 ||theta - w||^2 is a quadratic with
    curvature C_i = lam H_i (H_i + lam)^-1 and minimum x_i: w* is FedAvg's fixed point on the
    F_i. Client i's last local step starts from w_i = x_i + (I - eta C_i)^(K_i - 1) (w* - x_i),
    and theta_i* = argmin f_i(theta) + lam/2 ||theta - w_i||^2 = (H_i + lam)^-1 (H_i x_i + lam w_i)
    (w_i = w* with one local step: the Moreau envelope's own fixed point)."""
    eye = torch.eye(q.D, dtype=torch.float64)
    curv = [LAM * h @ torch.linalg.inv(h + LAM * eye) for h in q.hessians()]
    w = q.fixed_point(curv, ETA, steps)
    thetas = []
    for h, c, x, k in zip(q.hessians(), curv, q.own_optima(), steps):
        last = x + torch.linalg.matrix_power(eye - ETA * c, k - 1) @ (w - x)
        thetas.append(torch.linalg.solve(h + LAM * eye, h @ x + LAM * last))
    return w, thetas


def dist(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("steps,inner,rounds", [([1] * 4, 1, 100), ([1, 3, 6, 10], 16, 30)],
                         ids=["one-local-step-K1", "1-to-10-local-steps-K16"])
def test_personal_models_reach_the_moreau_envelope_fixed_point(steps, inner, rounds):
    """One local step per round: theta_i is warm-started across rounds, so even K = 1 inner step
    reaches the exact fixed point. 1 to 10 local steps: K = 16 solves each personal problem to
    ~1e-8 of its start, and w stops at FedAvg's fixed point on the envelopes. beta = 1.5."""
    alg = A.pfedme(sgd(ETA), lam=LAM, inner_steps=inner, inner_lr=NU, server_lr=1.5)
    state, cstates = q.train(alg, rounds, steps)
    w, thetas = closed_form(steps)
    assert dist(state.params["w"], w) < 1e-6
    for i, theta in enumerate(thetas):
        assert dist(alg.personalize(state.params, cstates[i])["w"], theta) < 1e-6
        assert dist(theta, q.own_optima()[i]) > 0.1  # between the own optimum and w*
    assert dist(thetas[0], thetas[1]) > 0.3


def test_first_round_matches_the_algorithm_by_hand():
    """Round 1 from w = 0, K_i local steps of (K inner steps, then w's envelope step), written
    out with the matrices; the server mixes the mean delta with beta."""
    steps, inner, beta = [1, 2, 3, 2], 3, 0.7
    state, cstates = q.train(A.pfedme(sgd(ETA), lam=LAM, inner_steps=inner, inner_lr=NU, server_lr=beta), 1, steps)
    deltas = []
    for i, (h, x) in enumerate(zip(q.hessians(), q.own_optima())):
        w = theta = torch.zeros(q.D, dtype=torch.float64)
        for _ in range(steps[i]):
            for _ in range(inner):
                theta = theta - NU * (h @ (theta - x) + LAM * (theta - w))
            w = w - ETA * LAM * (w - theta)
        deltas.append(w)
        assert dist(cstates[i]["theta"]["w"], theta) < 1e-12
    assert dist(state.params["w"], beta * sum(p * d for p, d in zip(q.weights(), deltas))) < 1e-12


def test_loop_and_vmap_agree_and_runs_repeat():
    alg = A.pfedme(sgd(ETA), lam=LAM, inner_steps=3, inner_lr=NU)
    (s0, c0), (s1, c1), (s2, c2) = [q.train(alg, 4, [1, 3, 6, 10], rt)
                                    for rt in (LoopRuntime(), LoopRuntime(), VmapRuntime())]
    assert torch.equal(s0.params["w"], s1.params["w"])
    assert dist(s0.params["w"], s2.params["w"]) < 1e-12
    for i in c0:
        assert torch.equal(c0[i]["theta"]["w"], c1[i]["theta"]["w"])
        assert dist(c0[i]["theta"]["w"], c2.get([i])["theta"]["w"][0]) < 1e-12


def test_bad_parameters_and_batch_norm_are_refused():
    with pytest.raises(ValueError, match="lam must be > 0"):
        A.pfedme(lam=0.0)
    with pytest.raises(ValueError, match="inner_steps"):
        A.pfedme(inner_steps=0)
    from atoll.models import build
    with pytest.raises(ValueError, match="no BatchNorm"):
        A.pfedme().client(model_loss(build("mlp", 4, 3, seed=0, batch_norm=True)))
