"""Seed 004's per-client sparse downlink in deployment (docs/communication.md, "In deployment"):
each sampled client receives the coordinates that changed since the model it holds, the bytes on
the wire equal the simulation's count round by round, and the model equals the simulation's."""
import json
import threading

import pytest
import torch

from atoll import config, sampling
from atoll.codecs import flat
from atoll.deploy import local
from atoll.deploy.client import Client
from atoll.deploy.server import Server
from atoll.runtime.loop import LoopRuntime
from atoll.simulation import simulate

from .conftest import ServerThread, small_config, wait_for

COMM = '\ndtype = "float64"\n[comm]\ndownlink = "{base}"\nserver_topk = 0.05\nanchor_every = {anchor}\n'


def tracker_config(tmp_path, base="client", anchor=0, rounds=5, clients=4, per_round=2):
    small_config(tmp_path, rounds=rounds, clients=clients, per_round=per_round, timeout=20.0)
    text = (tmp_path / "exp.toml").read_text()
    head, rest = text.split("[data]", 1)  # top-level keys before the first table
    (tmp_path / "exp.toml").write_text(head + 'dtype = "float64"\n[data]' + rest
                                       + COMM.split("\n", 2)[2].format(base=base, anchor=anchor))
    return config.load(tmp_path / "exp.toml")


def deployed(cfg, tmp_path, state_dir=None, make=Client):
    """Run ``cfg`` with one in-process server and one in-process client per enrolled id."""
    enrolled = local.prepare(cfg, tmp_path, tokens=True)
    server = Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="localhost",
                    port=0, auth="token", plots=False, linger_s=0.5)
    thread = ServerThread(server)
    clients = [make(f"localhost:{server.port}", e["data"], ca=e["ca"], token=e["token"],
                      backoff=(0.1, 1.0), give_up_s=30, poll_s=2.0,
                      state_path=None if state_dir is None else state_dir / f"{e['name']}.state.pt")
               for e in enrolled]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for c, t in zip(clients, threads):  # one at a time: building a model draws from torch's global
        t.start()                       # generator, which threads share (processes do not)
        wait_for(lambda: c.run_id is not None, 30, "the client to join")
    thread.join(90)
    for t in threads:
        t.join(10)
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return server, clients, lines


def simulated(cfg):
    algorithm, model, data, plan = config.build(cfg)
    return simulate(algorithm, model, data, plan, runtime=LoopRuntime())


def assert_same_model(got, want):
    for k, v in want.items():
        assert got[k].dtype == torch.float64
        scale = float(v.abs().max()) + 1.0
        assert torch.allclose(got[k], v, rtol=0, atol=1e-12 * scale), k


@pytest.mark.parametrize("base,anchor", [("client", 0), ("client", 2), ("initial", 3)])
def test_deployed_tracker_sends_per_client_deltas_with_the_simulations_bytes(tmp_path, base, anchor):
    cfg = tracker_config(tmp_path, base, anchor)
    sim = simulated(cfg)
    server, clients, lines = deployed(cfg, tmp_path)
    print("bytes_down deployed", [m["bytes_down"] for m in lines])
    print("bytes_down simulated", [m["bytes_down"] for m in sim.metrics])
    assert [m["bytes_down"] for m in lines] == [m["bytes_down"] for m in sim.metrics]
    assert_same_model(server.coordinator.state.params, sim.state.params)
    hashes = server.coordinator.hashes  # every client rebuilt exactly a model the server had
    assert all(c.held["hash"] == hashes[c.held["round"]] for c in clients if c.held is not None)
    last_anchor = anchor and (cfg.rounds - 1) % anchor == 0  # then all 4 clients got the last model
    assert sum(c.held is not None and c.held["round"] == cfg.rounds - 1 for c in clients) == (
        4 if last_anchor else 2)


class Forgetful(Client):
    """A client whose disk is wiped after it answers round ``forget_after``: it restarts with no
    state file, as a reinstalled client does."""
    forget_after, received = None, None

    def _setup(self, info):
        self.info = info
        super()._setup(info)

    def _receive(self, task, rest):
        self.received = (self.received or []) + [(task.round, len(task.data))]
        return super()._receive(task, rest)

    def _answer(self, conn, task):
        super()._answer(conn, task)
        if task.round == self.forget_after:
            self.state_path.unlink()
            self.run_id = None
            self._setup(self.info)  # what a restarted client does: it holds no model


def test_a_client_that_lost_its_model_gets_the_dense_model_and_the_run_equals_simulation(tmp_path):
    cfg = tracker_config(tmp_path, rounds=6)
    text = (tmp_path / "exp.toml").read_text().replace("[comm]\n", "[comm]\nclients_hold_initial = false\n")
    (tmp_path / "exp.toml").write_text(text)
    cfg = config.load(tmp_path / "exp.toml")
    cohorts = [sampling.sample(4, r, cfg.seed, count=2) for r in range(1, 7)]
    # a client sampled in some round j >= 2 and again in a later round k
    victim, j, k = next((c, j, k) for j in range(2, 6) for k in range(j + 1, 7) for c in cohorts[j - 1]
                        if c in cohorts[k - 1] and all(c not in cohorts[i - 1] for i in range(j + 1, k)))
    made = []

    def make(*a, **kw):
        c = Forgetful(*a, **kw)
        c.forget_after = j if len(made) == victim else None
        made.append(c)
        return c

    state_dir = tmp_path / "states"
    state_dir.mkdir()
    sim = simulated(cfg)
    server, clients, lines = deployed(cfg, tmp_path, state_dir=state_dir, make=make)
    dense = flat.wire_size({f"w/{n}": v for n, v in sim.state.params.items()})
    assert (k, dense) in clients[victim].received  # the dense model, not a delta against nothing
    got, want = [m["bytes_down"] for m in lines], [m["bytes_down"] for m in sim.metrics]
    assert got[k - 1] > want[k - 1] and got[:k - 1] + got[k:] == want[:k - 1] + want[k:]
    assert_same_model(server.coordinator.state.params, sim.state.params)
    assert all(c.counts["refused"] == 0 and c.counts["accepted"] == sum(i in co for co in cohorts)
               for i, c in enumerate(clients))
