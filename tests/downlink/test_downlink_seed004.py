"""Seed 004: server top-k with error feedback, and per-client sparse downlink deltas.

Invariants: nothing is lost by error feedback; every client holds exactly the server's model
after applying its message (also after skipping many rounds, for every variant); with k = d the
scheme is FedAvg; messages have the predicted sizes and fall back to the dense model."""
import pytest
import torch

from atoll import algorithms, transforms
from atoll import tree as T
from atoll.algorithm import Algorithm
from atoll.codecs import flat, sparse_index
from atoll.downlink import DeltaTracker, apply, message, server_topk
from atoll.transport import wire


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _params(dtype=torch.float32):
    g = _gen(0)
    return {"fc.w": torch.randn(30, 40, generator=g, dtype=dtype), "fc.b": torch.randn(40, generator=g, dtype=dtype),
            "emb": torch.randn(25, generator=g, dtype=dtype)}


def _random_like(params, seed):
    g = _gen(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_server_topk_applies_the_top_k_and_loses_nothing(momentum):
    params = _params(torch.float64)
    d = T.size(params)
    k = round(0.02 * d)
    t = server_topk(0.02, momentum=momentum)
    state = t.init(params)
    m_prev, err_prev = T.zeros_like(params), T.zeros_like(params)
    sum_out, sum_m = T.zeros_like(params), T.zeros_like(params)
    for r in range(30):
        g = _random_like(params, 10 + r)
        out, state = t.update(g, state, params, {})
        m = T.add(T.scale(m_prev, momentum), g)  # the seed's g_t = rho * g_{t-1} + g_t
        acc = torch.cat([(m[n] + err_prev[n]).reshape(-1) for n in params])
        top = acc.abs().argsort(descending=True)[:k]
        expected = torch.zeros_like(acc)
        expected[top] = acc[top]
        assert torch.equal(T.flatten(out), expected) and int((T.flatten(out) != 0).sum()) == k
        m_prev, err_prev = m, state["err"]
        sum_out, sum_m = T.add(sum_out, out), T.add(sum_m, m)
    for n in params:
        torch.testing.assert_close(sum_out[n] + state["err"][n], sum_m[n], rtol=0, atol=1e-10)
    assert float(T.norm(state["err"])) > 0


def test_server_topk_rejects_bad_arguments():
    for kwargs, match in [({}, "exactly one"), ({"fraction": 0.1, "k": 3}, "exactly one"),
                          ({"fraction": 0.0}, "fraction"), ({"k": 0}, "k must"), ({"k": 5, "momentum": 1.0}, "momentum")]:
        with pytest.raises(ValueError, match=match):
            server_topk(**kwargs)


def _holds(model, params):
    return all(torch.equal(model[k], params[k]) and model[k].dtype == params[k].dtype for k in params)


@pytest.mark.parametrize("base,anchor_every,holds", [("client", 0, False), ("client", 7, False),
                                                     ("client", 0, True), ("initial", 0, False),
                                                     ("initial", 7, False)])
def test_every_client_holds_the_server_model(base, anchor_every, holds):
    n_clients, rounds = 25, 40
    params = {**_params(), "h": torch.randn(12, generator=_gen(3)).half()}  # mixed dtypes
    w0 = T.clone(params)
    server = transforms.chain(server_topk(0.03, momentum=0.5), transforms.sgd(0.1))
    opt_state = server.init({k: v.float() for k, v in params.items()})
    tracker = DeltaTracker(n_clients, base, anchor_every, holds_initial=holds)
    ts = tracker.init(params)
    blank = T.zeros_like(params)  # a client that never synced knows only the architecture
    clients = {c: T.clone(w0) for c in range(n_clients)} if base == "initial" or holds else {}
    for r in range(1, rounds + 1):
        others = torch.randperm(n_clients - 1, generator=_gen(100 + r))[:4] + 1
        cohort = ([0] if r in (1, rounds) else []) + others.tolist()  # client 0 skips rounds 2..39
        msgs, ts = tracker.messages(ts, cohort, params)
        for c, msg in zip(cohort, msgs):
            data = wire.dumps(msg)
            clients[c] = apply(clients.get(c, blank), wire.loads(data))
            assert _holds(clients[c], params), (r, c)
        grads = {k: -v for k, v in _random_like({k: v.float() for k, v in params.items()}, r).items()}
        updates, opt_state = server.update(grads, opt_state, params, {})
        new = {k: (params[k].float() + updates[k]).to(params[k].dtype) for k in params}
        ts = tracker.commit(ts, params, new)
        params = new
        if tracker.anchor_due(ts):
            msg, ts = tracker.anchor(ts, params)
            for c in range(n_clients):
                clients[c] = apply(clients.get(c, blank), msg)
                assert _holds(clients[c], params)
    msgs, ts = tracker.messages(ts, list(range(n_clients)), params)  # everyone, whatever they missed
    for c, msg in zip(range(n_clients), msgs):
        assert _holds(apply(clients.get(c, blank), msg), params), c
    assert sum(t.numel() for t in ts.values()) == T.size(params) + n_clients + 2  # no model per client


def test_message_sizes_follow_the_changes():
    params = _params()
    d = T.size(params)
    k = round(0.01 * d)
    server = transforms.chain(server_topk(k=k), transforms.sgd(1.0))
    opt = server.init(params)
    trackers = {name: DeltaTracker(3, base, every) for name, base, every in
                [("client", "client", 0), ("initial", "initial", 0), ("anchored", "initial", 10)]}
    states = {n: t.init(params) for n, t in trackers.items()}
    sizes = {n: [] for n in trackers}
    for n, t in trackers.items():
        _, states[n] = t.messages(states[n], [0, 1], params)
    for r in range(1, 31):
        updates, opt = server.update(_random_like(params, r), opt, params, {})
        new = transforms.apply_updates(params, updates)
        for n, t in trackers.items():
            states[n] = t.commit(states[n], params, new)
            if t.anchor_due(states[n]):
                _, states[n] = t.anchor(states[n], new)
        params = new
        for n, t in trackers.items():
            msgs, states[n] = t.messages(states[n], [0], params)  # client 0 every round, client 1 never
            sizes[n].append(len(wire.dumps(msgs[0])))
        msg = message(params, states["client"]["changed"], r - 1)
        assert msg["v"].numel() == k  # exactly the k applied coordinates changed
        idx = torch.nonzero(states["client"]["changed"] == r).reshape(-1)
        predicted = (8 + sparse_index.encoded_size(idx) + 3 * (2 + 5 + 2 + 4)
                     + (2 + 1 + 2 + 4 + 4 * k))  # header, streams, 3 index entry headers, values
        assert flat.wire_size(msg) == predicted
        assert sizes["client"][-1] == len(wire.dumps(msg))
    absent, _ = trackers["client"].messages(states["client"], [1], params)  # synced at round 0
    assert absent[0]["v"].numel() == int((states["client"]["changed"] > 0).sum())
    assert sizes["initial"][-1] > 10 * sizes["client"][-1]  # the change since w_0 keeps growing
    assert max(sizes["anchored"]) < sizes["initial"][-1] and sizes["anchored"][9] < sizes["anchored"][8]
    dense = flat.wire_size({f"w/{k}": v for k, v in params.items()})
    assert all(s <= dense for n in sizes for s in sizes[n])


def test_dense_model_when_that_is_smaller():
    params = _params()
    tracker = DeltaTracker(2)
    ts = tracker.init(params)
    (first,), ts = tracker.messages(ts, [0], params)
    assert set(first) == {f"w/{k}" for k in params}  # never synced: dense
    new = T.add(params, _random_like(params, 1))  # every coordinate changes
    ts = tracker.commit(ts, params, new)
    (msg,), ts = tracker.messages(ts, [0], new)
    assert set(msg) == {f"w/{k}" for k in params} and _holds(apply(params, msg), new)
    few = {k: v.clone() for k, v in new.items()}
    few["fc.b"][3] += 1.0
    ts = tracker.commit(ts, new, few)
    (msg,), ts = tracker.messages(ts, [0], few)
    assert msg["v"].tolist() == [float(few["fc.b"][3])] and _holds(apply(new, msg), few)
    zero = T.clone(few)
    zero["emb"][0] = 0.0
    neg = T.clone(zero)
    neg["emb"][0] = -0.0
    ts = tracker.commit(tracker.commit(ts, few, zero), zero, neg)  # 0.0 -> -0.0 changes the bits
    assert int(ts["changed"][1200 + 40]) == int(ts["round"]) == 4


def test_k_equal_to_model_size_is_fedavg():
    params = _params(torch.float64)
    d = T.size(params)
    fedavg = algorithms.fedavg(transforms.sgd(0.05))
    seed004 = Algorithm("seed004", transforms.sgd(0.05), transforms.chain(server_topk(k=d), transforms.sgd(1.0)))
    s1, s2 = fedavg.init(params), seed004.init(params)
    tracker = DeltaTracker(4)
    ts = tracker.init(params)
    msgs, ts = tracker.messages(ts, list(range(4)), params)
    held = {c: apply(T.zeros_like(params), m) for c, m in enumerate(msgs)}
    for r in range(6):
        deltas = T.stack([_random_like(params, 50 + 4 * r + c) for c in range(3)])
        weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
        s1 = fedavg.server_round(s1, deltas, weights)
        new = seed004.server_round(s2, deltas, weights)
        ts = tracker.commit(ts, s2.params, new.params)
        s2 = new
        assert _holds(s2.params, s1.params)
        assert float(T.norm(s2.opt_state[0]["err"])) == 0.0
        c = r % 4
        (msg,), ts = tracker.messages(ts, [c], s2.params)
        held[c] = apply(held[c], msg)
        assert _holds(held[c], s1.params)


def test_bad_tracker_input_is_refused():
    with pytest.raises(ValueError, match="base"):
        DeltaTracker(3, base="last")
    with pytest.raises(ValueError, match="num_clients"):
        DeltaTracker(0)
    with pytest.raises(ValueError, match="anchor_every"):
        DeltaTracker(3, anchor_every=-1)
    params = _params()
    tracker = DeltaTracker(3)
    ts = tracker.init(params)
    with pytest.raises(ValueError, match=r"client id 3 not in \[0, 3\)"):
        tracker.messages(ts, [3], params)
    with pytest.raises(ValueError, match="coordinates"):
        tracker.commit(ts, {"a": torch.zeros(3)}, {"a": torch.ones(3)})
    with pytest.raises(ValueError, match="entry 'w/fc.b'"):
        apply(params, {**{f"w/{k}": v for k, v in params.items()}, "w/fc.b": torch.zeros(41)})
    with pytest.raises(ValueError, match="neither dense"):
        apply(params, {})
    bad = {**sparse_index.encode(torch.tensor([5, 2000]), "idx"), "v": torch.zeros(2)}
    with pytest.raises(ValueError, match="out of range"):
        apply(params, bad)
