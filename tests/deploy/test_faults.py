"""Faults: a client killed mid-round (the round closes at its deadline with the others), and a
server killed mid-run and restarted (training resumes; no round lost or counted twice)."""
import json
import signal
import subprocess
import sys
import threading
import time

import torch

from atoll import config
from atoll.client import model_loss
from atoll.deploy import local
from atoll.deploy.client import Client
from atoll.deploy.coordinator import downlink_bytes
from atoll.deploy.server import Server
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.round import client_round
from atoll.simulation import simulate

from .conftest import ServerThread, atoll_process, env, free_port, small_config, wait_for

VICTIM = """
import sys, time
from pathlib import Path
from atoll.transport.grpc.client import Connection  # no torch: this client only takes a task
conn = Connection(sys.argv[1], ca=Path(sys.argv[2]).read_bytes(), token=Path(sys.argv[3]).read_text())
conn.join()
task = conn.get_task(10)
print("GOT", task.kind, task.round, flush=True)
time.sleep(120)
"""


def run_clients(enrolled, port, **kw):
    clients = [Client(f"localhost:{port}", e["data"], ca=e["ca"], token=e.get("token"),
                      cert=e.get("cert"), key=e.get("key"), backoff=(0.1, 1.0), **kw) for e in enrolled]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    return clients, threads


def lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def test_client_killed_mid_round_round_closes_at_deadline(tmp_path, kill_on_exit):
    timeout = 3.0
    cfg = small_config(tmp_path, rounds=2, clients=4, timeout=timeout)
    enrolled = local.prepare(cfg, tmp_path, tokens=True)
    algorithm, model, data, plan = config.build(cfg)
    state, update = algorithm.init(dict(model.named_parameters())), algorithm.client(model_loss(model))
    # warm torch.func up in this process, so the surviving clients answer well within the deadline
    client_round(algorithm, update, downlink_bytes(algorithm, state, cfg.seed), None,
                        data.clients[0], 0, 1, plan.work, plan.seed)
    server = Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="localhost",
                    port=0, auth="token", plots=False, linger_s=0)
    thread = ServerThread(server)
    victim_entry = enrolled[2]
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, f"localhost:{server.port}",
                               victim_entry["ca"], victim_entry["token"]], env=env(),
                              stdout=subprocess.PIPE, text=True)
    kill_on_exit(victim)
    assert victim.stdout.readline().split() == ["GOT", "TASK", "1"]  # it holds round 1's task
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    t0 = time.monotonic()
    clients, threads = run_clients([e for e in enrolled if e is not victim_entry], server.port)
    thread.join(60)
    for t in threads:
        t.join(10)
    assert all(c.counts["accepted"] == 2 for c in clients)
    got = lines(tmp_path / "run")
    assert [(m["clients_sampled"], m["clients_succeeded"]) for m in got] == [(4, 3), (4, 3)]
    assert time.monotonic() - t0 >= timeout  # round 2 waited for the dead client's deadline

    for _ in range(2):  # reference: the same rounds without client 2
        state, _, _ = LoopRuntime().run_round(algorithm, update, state, {}, [0, 1, 3], data,
                                              plan.work, plan.seed)
    for k, v in state.params.items():
        assert torch.allclose(server.coordinator.state.params[k], v, rtol=0, atol=1e-6), k


def test_server_killed_and_restarted_resumes_without_losing_or_repeating_rounds(tmp_path, kill_on_exit):
    cfg = small_config(tmp_path, rounds=12, clients=3)
    enrolled = local.prepare(cfg, tmp_path, tokens=True)
    run_dir, port = tmp_path / "run", free_port()
    args = ("server", tmp_path / "exp.toml", "--port", port, "--host", "localhost", "--certs",
            tmp_path / "certs", "--out", run_dir, "--no-plots", "--set", "deploy.auth=token")
    first = atoll_process(*args, log=tmp_path / "server1.log")
    kill_on_exit(first)
    clients, threads = run_clients(enrolled, port)
    wait_for(lambda: len(lines(run_dir)) >= 3, 60, "three rounds")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_after = len(lines(run_dir))
    assert killed_after < 12, "the run finished before the kill; make rounds slower"
    second = atoll_process(*args, log=tmp_path / "server2.log")
    kill_on_exit(second)
    assert second.wait(60) == 0, (tmp_path / "server2.log").read_text()
    for t in threads:
        t.join(10)
    assert all(c.counts["reconnects"] >= 1 and c.counts["accepted"] >= 12 for c in clients)
    assert f"resuming {run_dir} after round" in (tmp_path / "server2.log").read_text()
    assert [m["round"] for m in lines(run_dir)] == list(range(1, 13))

    algorithm, model, data, plan = config.build(cfg)
    sim = simulate(algorithm, model, data, plan, runtime=LoopRuntime())
    deployed = torch.load(run_dir / "model.pt")
    for k, v in sim.state.params.items():  # a lost or repeated round would change the model
        assert torch.allclose(deployed[k], v, rtol=0, atol=1e-6), k
    for got, want in zip(lines(run_dir), sim.metrics):
        assert got["clients_succeeded"] == 3 and abs(got["train_loss"] - want["train_loss"]) < 1e-6
