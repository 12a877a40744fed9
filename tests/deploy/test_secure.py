"""[secure] in deployment: the four SecAgg stages with real clients over loopback gRPC give the
model the simulated secure round gives, bit for bit, and survive dropouts at every stage."""
import json
import threading

import pytest
import torch

from atoll import config
from atoll.deploy import local
from atoll.deploy.client import Client
from atoll.deploy.server import Server
from atoll.runtime.loop import LoopRuntime
from atoll.simulation import simulate

from .conftest import ServerThread, small_config

SECURE = """
[secure]
method = "{method}"
clip = 0.5
bits = 16
stage_timeout = {stage_timeout}
"""


def secure_config(tmp, method="secagg", clients=5, rounds=2, extra="", stage_timeout=20.0):
    small_config(tmp, rounds=rounds, clients=clients, timeout=30.0)
    text = ('dtype = "float64"\n' + (tmp / "exp.toml").read_text()
            + SECURE.format(method=method, stage_timeout=stage_timeout) + extra)
    (tmp / "exp.toml").write_text(text)
    return config.load(tmp / "exp.toml")


def start(cfg, tmp, clients=None, tokens=True, **kw):
    enrolled = local.prepare(cfg, tmp, tokens=tokens)
    server = Server(cfg, run_dir=tmp / "run", certs_dir=tmp / "certs", host="127.0.0.1", port=0,
                    auth="token" if tokens else "mtls", plots=False, linger_s=0.5)
    thread = ServerThread(server)
    make = clients or (lambda e, port: Client(f"127.0.0.1:{port}", e["data"], **creds(e),
                                              backoff=(0.1, 1.0), give_up_s=20))
    parties = [make(e, server.port) for e in enrolled]
    threads = [threading.Thread(target=p.run, daemon=True) for p in parties]
    for t in threads:
        t.start()
    return server, thread, parties, threads


def creds(e):
    """A client's credentials: its token, or its enrolment certificate and key."""
    if e.get("token"):
        return {"ca": e["ca"], "token": e["token"]}
    return {"ca": e["ca"], "cert": e["cert"], "key": e["key"]}


def finish(server, thread, threads, timeout=120):
    thread.join(timeout)
    for t in threads:
        t.join(15)
        assert not t.is_alive(), "a client did not finish"


def lines(tmp):
    return [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,clients,extra", [
    ("secagg", 4, ""), ("secagg+", 6, "neighbours = 4\n"),
    # SCAFFOLD's control variates go into the same secure sum as the delta
    ("secagg", 4, '[algorithm]\nname = "scaffold"\n'),
    # a robust rule over secure buckets: one secure sum per bucket, the median of their means
    ("secagg", 6, '[aggregator]\nname = "median"\nbucket = 3\n'),
    # a linear codec: the sketch tables are summed, the mean table decoded once
    ("secagg", 4, '[comm]\nuplink = "count_sketch(3, 100, estimator=mean)"\n')],
    ids=["secagg", "secagg+", "scaffold", "buckets", "sketch"])
def test_deployed_secure_rounds_equal_the_simulated_secure_rounds(tmp_path, method, clients, extra):
    cfg = secure_config(tmp_path, method, clients, extra=extra)
    algorithm, model, data, plan = config.build(cfg)  # first: building seeds torch's global generator
    sim = simulate(algorithm, model, data, plan, runtime=LoopRuntime(), plots=False)
    server, thread, parties, threads = start(cfg, tmp_path)
    finish(server, thread, threads)
    got = server.coordinator.state.params
    for k, v in sim.state.params.items():
        assert got[k].dtype == torch.float64 and torch.equal(got[k], v), k
    for line, want in zip(lines(tmp_path), sim.metrics):
        assert line.get("secure_buckets") == want.get("secure_buckets")
        if "bucket" in extra:
            assert line["secure_buckets"] == 2 and line["secure_stage_survivors"] == [3] * 4
            assert line["secure_survivors"] == want["secure_survivors"] == clients
            continue
        assert line["secure_stage_survivors"] == [clients] * 4
        assert line["secure_survivors"] == want["secure_survivors"] == clients
        assert line["clients_succeeded"] == clients and "failures" not in line
        assert abs(line["train_loss"] - want["train_loss"]) <= 1e-12 * abs(want["train_loss"])
        fan = clients - 1 if method == "secagg" else 4
        if "sketch" in extra:  # the 3 x 100 table and one weight, not the model
            assert line["secure_bytes_up"] == -(-(300 + 1) * line["secure_bits"] // 8)
        if "scaffold" in extra:  # delta and control variate: twice the model, one weight
            d = sum(v.numel() for v in got.values())
            assert line["secure_bytes_up"] == -(-(2 * d + 1) * line["secure_bits"] // 8)
            c = server.coordinator.state.extra["broadcast"]["c"]
            assert sum(int(torch.count_nonzero(v)) for v in c.values()) > 0
        assert line["secure_stage_bytes_up"] == [64, fan * 120, line["secure_bytes_up"], fan * 49]
        assert line["secure_client_s"] > 0 and line["secure_server_s"] > 0
    assert all(p.counts["accepted"] == 2 and not p.secure.refused for p in parties)


class Dropper(Client):
    """A client that stops answering at ``stage`` of round ``at`` (it times out there)."""

    def __init__(self, *a, stage=0, at=1, **kw):
        super().__init__(*a, **kw)
        self.stage, self.at, self.inputs = stage, at, {}

    def _stage(self, conn, task):
        if task.stage == 1:
            self.inputs[task.round] = self.secure.x
        if (task.round, task.stage) != (self.at, self.stage):
            super()._stage(conn, task)


def droppers(stages: dict):
    """Client factory: client ``i`` stops answering at ``stages.get(i)`` (0: never)."""
    def make(e, port):
        cid = int(e["name"].split("-")[1])
        return Dropper(f"127.0.0.1:{port}", e["data"], **creds(e),
                       backoff=(0.1, 1.0), give_up_s=20, stage=stages.get(cid, 0))
    return make


def expected_model(cfg, parties, summed: list[int]):
    """Round 1's model from the plain modular sum of the clients' encoded inputs in ``summed``."""
    from atoll.client import buffer_names, params_of
    from atoll.runtime.secure_round import secure_step as server_step
    algorithm, model, data, plan = config.build(cfg)
    state = algorithm.init(params_of(model), buffers=buffer_names(model))
    sec = algorithm.secure
    setup = sec.setup(sorted(p.cid for p in parties), 1, len(parties[0].inputs[1]))
    total = sum(sec.ring(parties[i].inputs[1], setup) for i in summed) & ((1 << setup.bits) - 1)
    mean = sec.mean(total, setup, state.params, len(summed))
    return server_step(algorithm, state, [{"delta": mean, "aux": {}}], [0], plan.seed,
                       cohort=len(summed)).params


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2,
                                   pytest.param(3, marks=pytest.mark.slow), 4])
def test_a_client_that_stops_answering_at_any_stage_leaves_the_exact_sum_of_the_survivors(tmp_path, stage):
    cfg = secure_config(tmp_path, "secagg+", 5, rounds=1, extra="neighbours = 4\n", stage_timeout=1.5)
    server, thread, parties, threads = start(cfg, tmp_path, droppers({2: stage}))
    finish(server, thread, threads)
    line = lines(tmp_path)[0]
    alive = [5] * (stage - 1) + [4] * (5 - stage)
    assert line["secure_stage_survivors"] == alive
    assert line["failures"] == [[2, f"secure stage {stage}: no answer within secure.stage_timeout = 1.5 s"]]
    summed = [0, 1, 2, 3, 4] if stage == 4 else [0, 1, 3, 4]  # after stage 3 its input is in
    assert line["secure_survivors"] == len(summed)
    want = expected_model(cfg, parties, summed)
    for k, v in want.items():
        assert torch.equal(server.coordinator.state.params[k], v), k


def test_below_the_threshold_the_round_fails_cleanly_and_the_next_round_runs(tmp_path):
    cfg = secure_config(tmp_path, "secagg", 4, rounds=2, extra="threshold = 3\n", stage_timeout=1.5)
    server, thread, parties, threads = start(cfg, tmp_path, droppers({1: 3, 2: 3}))
    before = {k: v.clone() for k, v in server.coordinator.state.params.items()}
    states, write = [], server.coordinator._write
    server.coordinator._write = lambda rnd, state, t: (states.append(state), write(rnd, state, t))
    finish(server, thread, threads)
    first, second = lines(tmp_path)
    assert first["secure_stage_survivors"] == [4, 4, 2]
    assert [-1, "secure aggregation failed: stage 3: 2 clients answered, fewer than the threshold 3"] \
        in first["failures"]
    assert states[0].round == 1 and all(torch.equal(states[0].params[k], v) for k, v in before.items())
    assert second["secure_stage_survivors"] == [4] * 4 and "failures" not in second
    assert any(not torch.equal(states[1].params[k], v) for k, v in before.items())


def test_deployed_distributed_dp_draws_each_clients_noise_from_its_secret(tmp_path):
    extra = '[privacy]\nmode = "distributed"\naccountant = "rdp"\nclip = 0.5\nnoise_multiplier = 1.0\n'
    cfg = secure_config(tmp_path, "secagg", 4, extra=extra)
    algorithm, model, data, plan = config.build(cfg)
    sim = simulate(algorithm, model, data, plan, runtime=LoopRuntime(), plots=False)
    server, thread, parties, threads = start(cfg, tmp_path)
    finish(server, thread, threads)
    got = server.coordinator.state.params
    for line, want in zip(lines(tmp_path), sim.metrics):
        assert line["secure_survivors"] == 4 and "failures" not in line
        assert line["epsilon"] == pytest.approx(want["epsilon"], rel=1e-12)  # the same events
    # the simulation draws the noise from the run seed; each deployed client from its secret
    assert any(not torch.equal(got[k], v) for k, v in sim.state.params.items())


@pytest.mark.parametrize("method, extra", [
    ("ckks", "")])
def test_a_homomorphic_sum_without_its_decryptors_is_refused_by_the_server(tmp_path, method, extra):
    if method == "ckks":
        pytest.importorskip("tenseal")
    cfg = secure_config(tmp_path, method, 4, extra=extra)
    local.prepare(cfg, tmp_path, tokens=True)
    with pytest.raises(ValueError, match="needs the dealer's public key and the decryptors"):
        Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="127.0.0.1", port=0,
               auth="token", plots=False, linger_s=0.5)
