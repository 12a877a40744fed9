"""Split learning (``atoll.vertical.split``): the loss trajectory equals centralised training of the
joined model in float64; the bytes that cross are what the shapes say; malformed messages between
parties are refused with the party and the field named, before any state changes."""
import copy

import pytest
import torch
from torch import nn

from atoll.vertical.channel import PartyError
from atoll.vertical.split import BottomParty, JoinedModel, LabelParty, SplitNN, batches

N, COLS, K = 96, {"bank": 4, "telecom": 3, "shop": 2}, {"bank": 3, "telecom": 2, "shop": 2}


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, sum(COLS.values()), generator=g, dtype=torch.float64)
    y = ((x[:, 0] - x[:, 5] + 0.5 * x[:, 8] + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)) > 0.8)
    return x, y.to(torch.float64).unsqueeze(1)


def _models(seed=0):
    torch.manual_seed(seed)
    bottoms = [nn.Sequential(nn.Linear(COLS[p], K[p]), nn.Tanh()).double() for p in COLS]
    top = nn.Sequential(nn.Linear(sum(K.values()), 4), nn.ReLU(), nn.Linear(4, 1)).double()
    return bottoms, top


def _columns():
    out, at = [], 0
    for p in COLS:
        out.append(slice(at, at + COLS[p]))
        at += COLS[p]
    return out


def _split(x, y, bottoms, top, make_opt, **kw):
    parties = [BottomParty(p, b, x[:, c], make_opt, record=True)
               for p, b, c in zip(COLS, bottoms, _columns())]
    label = LabelParty("bank", top, y, nn.functional.binary_cross_entropy_with_logits, make_opt, K, **kw)
    return SplitNN(parties, label)


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.5),
                                      lambda ps: torch.optim.Adam(ps, lr=0.02)], ids=["sgd", "adam"])
def test_split_loss_trajectory_equals_centralised_training(make_opt):
    x, y = _data()
    bottoms, top = _models()
    central = JoinedModel(copy.deepcopy(bottoms), _columns(), copy.deepcopy(top))
    split = _split(x, y, bottoms, top, make_opt)
    opt = make_opt(central.parameters())
    plan = batches(N, 16, epochs=5, seed=3)
    ref = []
    for rows in plan:
        loss = nn.functional.binary_cross_entropy_with_logits(central(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.append(loss.item())
    got = split.fit(plan)
    assert len(got) == 30 and ref[-1] < 0.8 * ref[0]  # it learns
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-6 * max(1.0, max(ref))
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-12  # in practice: float rounding only
    with torch.no_grad():
        assert torch.allclose(split.predict(torch.arange(N)), central(x), rtol=1e-10, atol=1e-12)


def test_bytes_per_step_are_the_embeddings_gradients_and_rows():
    x, y = _data()
    split = _split(x, y, *_models(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    split.step(torch.arange(16))
    sent = dict(split.channel.sent)
    assert sent[("telecom", "bank", "embedding")] == 16 * 2 * 8
    assert sent[("bank", "telecom", "gradient")] == 16 * 2 * 8
    assert sent[("bank", "shop", "rows")] == 16 * 8
    assert not any(s == r for s, r, _ in sent)  # the bank's own bottom model costs nothing
    assert split.channel.total() == 2 * (16 * 8 + 2 * 16 * 2 * 8)


def _corrupt(split, party, make_bad):
    p = next(q for q in split.parties if q.name == party)
    embed = p.embed
    p.embed = lambda rows, sender, train=True: make_bad(embed(rows, sender, train))


@pytest.mark.parametrize("make_bad, words", [
    (lambda e: e.clone().fill_(float("nan")), "NaN"),
    (lambda e: e[:, :1], "shape"),
    (lambda e: e.float(), "dtype"),
    (lambda e: e.numpy(), "expected a tensor"),
])
def test_malformed_embedding_is_refused_naming_party_and_field(make_bad, words):
    x, y = _data()
    split = _split(x, y, *_models(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    before = copy.deepcopy(split.label.top.state_dict())
    _corrupt(split, "telecom", make_bad)
    with pytest.raises(PartyError, match=rf"party 'telecom': field 'embedding'.*{words}"):
        split.step(torch.arange(8))
    after = split.label.top.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the top model did not move


def test_missing_or_unknown_embedding_is_refused():
    x, y = _data()
    split = _split(x, y, *_models(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    rows = torch.arange(4)
    embs = split._embeddings(rows, train=False)
    with pytest.raises(PartyError, match="party 'shop': field 'embedding' is missing"):
        split.label.train_step(rows, {k: v for k, v in embs.items() if k != "shop"})
    with pytest.raises(PartyError, match="party 'eve': field 'embedding'"):
        split.label.train_step(rows, embs | {"eve": embs["shop"]})


@pytest.mark.parametrize("bad, words", [
    (lambda g: g + float("inf"), "NaN or infinite"),
    (lambda g: g.T, "shape"),
    (lambda g: g.to(torch.float32), "dtype"),
])
def test_malformed_gradient_is_refused_and_the_bottom_model_does_not_move(bad, words):
    x, y = _data()
    split = _split(x, y, *_models(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    shop = split.parties[2]
    before = copy.deepcopy(shop.model.state_dict())
    shop.embed(torch.arange(8), "bank")
    good = torch.ones(8, 2, dtype=torch.float64)
    with pytest.raises(PartyError, match=rf"party 'bank': field 'gradient'.*{words}"):
        shop.apply_gradient(bad(good), "bank")
    assert all(torch.equal(before[k], v) for k, v in shop.model.state_dict().items())
    with pytest.raises(PartyError, match="no embedding outstanding"):
        split.parties[1].apply_gradient(good, "bank")


@pytest.mark.parametrize("rows, words", [
    (torch.tensor([0, 1, N]), "outside"), (torch.tensor([0.0, 1.0]), "int64"),
    (torch.tensor([3, 3]), "repeats"), (torch.zeros(0, dtype=torch.int64), "0 rows"),
    (torch.zeros(2, 2, dtype=torch.int64), "1-D"),
])
def test_malformed_rows_from_the_label_party_are_refused(rows, words):
    x, y = _data()
    split = _split(x, y, *_models(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(PartyError, match=rf"party 'bank': field 'rows'.*{words}"):
        split.parties[1].embed(rows, "bank")


def test_gradient_noise_reaches_only_the_other_parties_and_is_seeded():
    x, y = _data()
    runs = []
    for seed in (5, 5, 6):
        split = _split(x, y, *_models(), lambda ps: torch.optim.SGD(ps, lr=0.1), noise_std=0.5, noise_seed=seed)
        split.parties[0].record = True
        split.step(torch.arange(8))
        runs.append([p.received[0][1] for p in split.parties])
    clean = _split(x, y, *_models(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    clean.step(torch.arange(8))
    own = clean.parties[0].received[0][1]
    assert torch.equal(runs[0][0], own)  # the label party's own bottom: no noise
    assert (runs[0][1] - clean.parties[1].received[0][1]).std() > 0.3
    assert torch.equal(runs[0][1], runs[1][1]) and not torch.equal(runs[0][1], runs[2][1])
