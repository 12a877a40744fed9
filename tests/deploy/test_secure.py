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


def start(cfg, tmp, clients=None, **kw):
    enrolled = local.prepare(cfg, tmp, tokens=True)
    server = Server(cfg, run_dir=tmp / "run", certs_dir=tmp / "certs", host="127.0.0.1", port=0,
                    auth="token", plots=False, linger_s=0.5)
    thread = ServerThread(server)
    make = clients or (lambda e, port: Client(f"127.0.0.1:{port}", e["data"], ca=e["ca"],
                                              token=e["token"], backoff=(0.1, 1.0), give_up_s=20))
    parties = [make(e, server.port) for e in enrolled]
    threads = [threading.Thread(target=p.run, daemon=True) for p in parties]
    for t in threads:
        t.start()
    return server, thread, parties, threads


def finish(server, thread, threads, timeout=120):
    thread.join(timeout)
    for t in threads:
        t.join(15)
        assert not t.is_alive(), "a client did not finish"


def lines(tmp):
    return [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,clients,extra", [("secagg", 4, ""),
                                                  ("secagg+", 6, "neighbours = 4\n")])
def test_deployed_secure_rounds_equal_the_simulated_secure_rounds(tmp_path, method, clients, extra):
    cfg = secure_config(tmp_path, method, clients, extra=extra)
    server, thread, parties, threads = start(cfg, tmp_path)
    algorithm, model, data, plan = config.build(cfg)
    sim = simulate(algorithm, model, data, plan, runtime=LoopRuntime(), plots=False)
    finish(server, thread, threads)
    got = server.coordinator.state.params
    for k, v in sim.state.params.items():
        assert got[k].dtype == torch.float64 and torch.equal(got[k], v), k
    for line, want in zip(lines(tmp_path), sim.metrics):
        assert line["secure_stage_survivors"] == [clients] * 4
        assert line["secure_survivors"] == want["secure_survivors"] == clients
        assert line["clients_succeeded"] == clients and "failures" not in line
        assert abs(line["train_loss"] - want["train_loss"]) <= 1e-12 * abs(want["train_loss"])
        fan = clients - 1 if method == "secagg" else 4
        assert line["secure_stage_bytes_up"] == [64, fan * 120, line["secure_bytes_up"], fan * 49]
        assert line["secure_client_s"] > 0 and line["secure_server_s"] > 0
    assert all(p.counts["accepted"] == 2 and not p.secure.refused for p in parties)
