"""Federated transfer learning (Liu et al. 2020) as split learning with A as the label party:
the two-party losses equal the objective trained in one graph (float64), over gRPC bit for bit
as in one process; every field a party receives is checked."""
import copy

import pytest
import torch
from torch import nn

from atoll.transport.grpc.vertical import VerticalServer
from atoll.vertical.channel import Channel, PartyError
from atoll.vertical.split import SplitNN, batches
from atoll.vertical.transfer import SourceParty, TargetParty, class_vector, ftl_loss

from test_vertical_grpc import PartyThread, pki  # noqa: F401 - the fixture

NA, NB, NO, D = 40, 30, 12, 3  # A's people, B's people, the overlap, representation width


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(NA, 5, generator=g, dtype=torch.float64)
    ya = (xa[:, 0] + 0.2 * torch.randn(NA, generator=g, dtype=torch.float64) > 0).to(torch.float64)
    xb = torch.randn(NB, 4, generator=g, dtype=torch.float64)
    overlap_a = torch.randperm(NA, generator=g)[:NO]  # A's row of overlap person j
    overlap_b = torch.randperm(NB, generator=g)[:NO]  # B's row of overlap person j
    return xa, ya, xb, overlap_a, overlap_b


def nets(seed=0):
    torch.manual_seed(seed)
    return (nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, D)).double(),
            nn.Sequential(nn.Linear(4, D), nn.Tanh()).double())


def sgd(ps):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.5, weight_decay=1e-3)


def parties(seed=0, **kw):
    xa, ya, xb, oa, ob = data(seed)
    na, nb = nets(seed)
    a = SourceParty("A", na, xa, ya, oa, "B", D, sgd, gamma=0.5, **kw)
    b = TargetParty("B", nb, xb[ob], D, sgd)
    return a, b


def test_two_parties_equal_the_objective_trained_in_one_graph():
    xa, ya, xb, oa, ob = data()
    a, b = parties()
    plan = batches(NO, 4, epochs=4, seed=3)
    got = SplitNN([b], a).fit(plan)
    na, nb = nets()
    opt_a, opt_b, y_pm = sgd(na.parameters()), sgd(nb.parameters()), 2 * ya - 1
    want = []
    for rows in plan:  # the reference: both networks in one autograd graph
        loss = ftl_loss(na(xa[oa[rows]]), nb(xb[ob[rows]]), class_vector(na(xa), y_pm), y_pm[oa[rows]], 0.5)
        opt_a.zero_grad(), opt_b.zero_grad(), loss.backward(), opt_a.step(), opt_b.step()
        want.append(loss.item())
    assert len(got) == 12 and max(abs(g - w) for g, w in zip(got, want)) <= 1e-12 * max(want)
    assert got[-1] < 0.8 * got[0]  # it trains
    for p, q in zip([*a.model.parameters(), *b.model.parameters()], [*na.parameters(), *nb.parameters()]):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12 * float(q.detach().abs().max()))
    # after Phi^A crosses, B scores any of its people alone, the ones outside the overlap included
    channel = Channel()
    channel.attach("B", b)
    a.share_phi(channel)
    assert channel.sent[("A", "B", "phi")] == D * 8
    phi = class_vector(na(xa), y_pm).detach()
    assert torch.allclose(b.score(xb), nb(xb).detach() @ phi, rtol=1e-12, atol=1e-12)


def test_over_grpc_the_same_losses_bit_for_bit_and_b_scores_alone(pki):  # noqa: F811
    plan = batches(NO, 4, epochs=2, seed=5)
    a, b = parties()
    local = SplitNN([b], a).fit(plan)
    a2, b2 = parties()
    server = VerticalServer(["telecom"], pki["identify"], tls=pki["tls"], timeout=10.0)
    port = server.start()
    b2.name = "telecom"
    a2.target, a2.dims = "telecom", {"telecom": D}
    thread = PartyThread(port, b2, pki["creds"])
    thread.start()
    try:
        channel = server.accept(timeout=20)
        remote = SplitNN([], a2, channel)
        got = remote.fit(plan)
        a2.share_phi(channel)
        channel.close()
        thread.join(20)
    finally:
        server.stop()
    assert thread.error is None and got == local
    xb = data()[2]
    assert torch.equal(b2.phi, a.phi())  # the models of both runs are the same, bit for bit
    assert torch.equal(b2.score(xb), b.model(xb).detach() @ a.phi())


def test_what_a_party_receives_is_checked():
    a, b = parties()
    with pytest.raises(PartyError, match="'rows' points outside"):  # A asks about a non-overlap person
        b.on("rows", torch.tensor([0, NO]), "A")
    for bad, why in [(torch.zeros(D + 1, dtype=torch.float64), "shape"),
                     (torch.full((D,), float("nan"), dtype=torch.float64), "NaN"),
                     (torch.zeros(D, dtype=torch.float32), "dtype")]:
        with pytest.raises(PartyError, match=f"field 'phi'.*{why}"):
            b.on("phi", bad, "A")
    with pytest.raises(RuntimeError, match="no 'phi'"):
        b.score(data()[2])
    rows = torch.arange(4)
    with pytest.raises(PartyError, match="'embedding'.*shape"):
        a.train_step(rows, {"B": torch.zeros(4, D + 1, dtype=torch.float64)})
    with pytest.raises(PartyError, match="'embedding' expected from it alone"):
        a.train_step(rows, {"B": torch.zeros(4, D, dtype=torch.float64), "C": torch.zeros(4, D)})
    with pytest.raises(PartyError, match="'embedding'.*NaN"):
        a.train_step(rows, {"B": torch.full((4, D), float("inf"), dtype=torch.float64)})
    xa, ya, _, oa, _ = data()
    na, _ = nets()
    for labels, overlap, what in [(ya * 2, oa, "labels"), (ya[:-1], oa, "labels"),
                                  (ya, torch.tensor([0, NA]), "overlap"), (ya, torch.tensor([1, 1]), "overlap"),
                                  (ya, oa.float(), "overlap")]:
        with pytest.raises(ValueError, match=what):
            SourceParty("A", na, xa, labels, overlap, "B", D, sgd)
    for bad in ({"gamma": -1.0}, {"gamma": float("nan")}, {"gamma": float("inf")},
                {"noise_std": float("nan")}, {"noise_std": -0.1}):
        with pytest.raises(ValueError, match="gamma and noise_std must be finite"):
            SourceParty("A", na, xa, ya, oa, "B", D, sgd, **bad)


def test_the_gradient_noise_defence_reaches_b_and_is_drawn_from_a_secret():
    a, b = parties(noise_std=0.5, noise_seed=7)
    a0, _ = parties()
    rows = torch.arange(4)
    u = b.on("rows", rows, "A")
    _, g = a.train_step(rows, {"B": u})
    _, g0 = a0.train_step(rows, {"B": u})
    assert 0.2 < float((g["B"] - g0["B"]).std()) < 1.0  # noise of std 0.5 on 12 entries
    a1, _ = parties(noise_std=0.5)  # no seed: a secret one
    assert not torch.equal(a1.train_step(rows, {"B": u})[1]["B"], g["B"])
