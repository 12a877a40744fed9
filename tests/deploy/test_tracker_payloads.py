"""The per-client downlink's payloads (atoll.deploy.downlink): whatever verified model a client
holds, it ends with exactly the server's model; a hostile payload is refused, naming what is
wrong, before it is decoded; a configuration the client could not reproduce is refused at start."""
import dataclasses
import struct

import pytest
import torch

from atoll import algorithms, codecs, config
from atoll import tree as T
from atoll.client import model_loss
from atoll.codecs import sparse_index
from atoll.deploy import downlink
from atoll.deploy.client import Client
from atoll.deploy.coordinator import Coordinator
from atoll.downlink import DeltaTracker
from atoll.transport import wire
from atoll.types import ServerState

from .test_tracker import tracker_config


def model():
    return {"a": torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4),
            "b": torch.zeros(5, dtype=torch.float64)}


def scaffold(tracker):
    return algorithms.scaffold(num_clients=tracker.num_clients, tracker=tracker)


def next_state(alg, state, gen):
    """A server step that changes 3 random coordinates (and the control variate)."""
    new = {k: v.clone() for k, v in state.params.items()}
    for _ in range(3):
        k = list(new)[int(torch.randint(2, (1,), generator=gen))]
        new[k].view(-1)[int(torch.randint(new[k].numel(), (1,), generator=gen))] += 1.0
    extra = {**state.extra, "tracker": alg.tracker.commit(state.extra["tracker"], state.params, new)}
    extra["broadcast"] = {"c": T.map(lambda v: v + 0.5, extra["broadcast"]["c"])}
    return ServerState(new, state.opt_state, state.round + 1, extra)


@pytest.mark.parametrize("base,anchor", [("client", 0), ("client", 3), ("initial", 0), ("initial", 2)])
def test_whatever_verified_model_a_client_holds_it_ends_with_the_servers(base, anchor):
    """Every client, holding nothing or any earlier model, applies its task (and any anchor)
    and holds exactly the server's model; the other broadcast entries arrive as they are."""
    alg = scaffold(DeltaTracker(3, base=base, anchor_every=anchor))
    state, gen = alg.init(model()), torch.Generator().manual_seed(0)
    history, rest = [state.params], T.join({"c": state.extra["broadcast"]["c"]})
    sizes = set()
    for r in range(1, 9):
        tracked, state = downlink.open_round(alg, state, [r % 3])
        for held in [None, *range(len(history))]:
            for c in range(3):
                tracked.anchored = set()
                copy = None if held is None else history[held]
                if c == r % 3:
                    data = tracked.task(c, held)
                    got, other = downlink.receive(data, copy, model(), rest)
                    assert torch.equal(other["c"]["a"], state.extra["broadcast"]["c"]["a"])
                    sizes.add(len(data))
                else:
                    data = tracked.sync(c, held)
                    if data is None:
                        assert tracked.anchor is None or (held is None or held < tracked.anchor_base)
                        continue
                    got, _ = downlink.receive(data, copy, model(), None)
                for k in got:
                    assert torch.equal(got[k], state.params[k]), (r, held, c, k)
        state = next_state(alg, state, gen)
        history.append(state.params)
    assert len(sizes) > 3  # sparse messages of several sizes, not always the dense model


def header(entries):
    """Wire bytes of a message header announcing ``entries`` [(name, dtype, shape)]."""
    out = [wire.MAGIC, struct.pack("<BI", wire.VERSION, len(entries))]
    for name, dtype, shape in entries:
        out.append(struct.pack("<H", len(name)) + name.encode()
                   + struct.pack(f"<BB{len(shape)}I", wire.CODE[dtype], len(shape), *shape))
    return b"".join(out)


def sparse(idx, values):
    return wire.dumps({**sparse_index.encode(torch.tensor(idx), "idx"), "v": values})


D = 17  # coordinates of model()
HOSTILE = {  # payload -> what the error must name
    "index out of range": (sparse([3, D + 4], torch.ones(2, dtype=torch.float64)), "out of range"),
    "more values than coordinates": (sparse(list(range(D + 1)), torch.ones(D + 1, dtype=torch.float64)),
                                     "'v' holds 18 values"),
    "a billion values announced": (header([("idx/q", torch.uint8, (1,)), ("idx/r", torch.uint8, (0,)),
                                           ("idx/m", torch.uint8, (1,)),
                                           ("v", torch.float64, (10 ** 9,))]), "truncated"),
    "values of the wrong dtype": (sparse([1, 2], torch.ones(2, dtype=torch.float32)), "'v' is torch.float32"),
    "values as integers": (sparse([1, 2], torch.ones(2, dtype=torch.int64)), "'v' is torch.int64"),
    "index stream too long": (wire.dumps({"idx/q": torch.zeros(40, dtype=torch.uint8),
                                          "idx/r": torch.zeros(0, dtype=torch.uint8),
                                          "idx/m": torch.zeros(1, dtype=torch.uint8),
                                          "v": torch.ones(2, dtype=torch.float64)}), "'idx/q'"),
    "dense entry of another shape": (wire.dumps({"w/a": torch.zeros(4, 4, dtype=torch.float64),
                                                 "w/b": torch.zeros(5, dtype=torch.float64)}), "'w/a'"),
    "unknown entries": (wire.dumps({"v": torch.ones(1, dtype=torch.float64), "x": torch.ones(1)}), "entries"),
    "three messages": (sparse([1], torch.ones(1, dtype=torch.float64)) * 3, "3 messages"),
    "larger than any real payload": (b"ATL" + bytes(2 * 400), "exceeds"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payload_is_refused_before_it_is_decoded(case, monkeypatch):
    data, word = HOSTILE[case]
    decoded = []
    if case != "index out of range":  # refused from the headers alone: nothing is decoded
        monkeypatch.setattr(wire, "loads", lambda *a, **k: decoded.append(a) or {})
    with pytest.raises(ValueError, match="downlink") as err:
        downlink.receive(data, model(), model(), {})
    assert word in str(err.value) and decoded == []


def test_sparse_payload_for_a_client_holding_nothing_is_refused():
    with pytest.raises(ValueError, match="holds no model"):
        downlink.receive(sparse([1], torch.ones(1, dtype=torch.float64)), None, model(), {})


class Stub:
    def __init__(self):
        self.sent = []

    def submit(self, r, task_id, message, **head):
        self.sent.append(r)
        return True, ""


class Task:
    def __init__(self, r, data):
        self.round, self.task_id, self.data = r, "t", data


def test_client_refuses_a_hostile_task_keeps_running_and_then_asks_for_the_dense_model(tmp_path):
    cfg = tracker_config(tmp_path)
    alg, net, fed, plan = config.build(cfg)
    c = Client("unused:1", fed.clients[0], token="t", insecure=True, backoff=(0.0, 0.0),
               state_path=tmp_path / "me.state.pt")
    c.algorithm, c.work, c.seed, c.cid, c.cdata = alg, plan.work, plan.seed, 0, fed.clients[0]
    c.client_update, c.run_id, c.states = alg.client(model_loss(net)), "r", None
    c._track(alg, net)
    assert c._claim()[0] == 0  # clients_hold_initial: it holds w_0, built from the config
    conn = Stub()
    d = sum(v.numel() for v in c.model0.values())
    c._answer(conn, Task(1, sparse([0, d + 9], torch.ones(2, dtype=torch.float64))))
    assert (conn.sent, c.counts["refused"], c._claim()) == ([], 1, None)
    dense = wire.dumps({f"w/{k}": v + 1.0 for k, v in c.model0.items()})
    c._answer(conn, Task(2, dense))
    assert conn.sent == [2] and c._claim() == (1, downlink.model_hash(c.held["params"]))
    assert torch.equal(c.held["params"]["0.bias"], c.model0["0.bias"] + 1.0)
    again = Client("unused:1", fed.clients[0], token="t", insecure=True, state_path=tmp_path / "me.state.pt")
    again.run_id = "r"
    again.states = again._load_states()
    again._track(alg, net)  # a restarted client reads its copy back from its state file
    assert again._claim() == c._claim()


def test_server_refuses_a_tracker_it_cannot_deploy_and_verifies_claims(tmp_path):
    cfg = tracker_config(tmp_path)
    alg, net, fed, plan = config.build(cfg)
    coded = dataclasses.replace(alg, downlink=codecs.cast("float16"))
    with pytest.raises(ValueError, match="downlink codec 'cast"):
        Coordinator(coded, net, fed, plan, run_dir=tmp_path / "a", plots=False)
    coord = Coordinator(alg, net, fed, plan, run_dir=tmp_path / "b", plots=False)
    h0 = downlink.model_hash(coord.state.params)
    assert coord._held((0, h0)) == 0
    assert coord._held((0, "0" * 64)) is None and coord._held((3, h0)) is None and coord._held(None) is None
