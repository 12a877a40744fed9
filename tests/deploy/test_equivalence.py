"""A server and 4 client processes train FedAvg to the model the simulation of the same config
and seeds trains (reference runtime), over TLS with client certificates."""
import json

import torch

from atoll import config
from atoll.deploy import local
from atoll.runtime.loop import LoopRuntime
from atoll.simulation import simulate

from .conftest import atoll_process, free_port, small_config


def test_server_and_four_client_processes_match_simulation(tmp_path, kill_on_exit):
    cfg = small_config(tmp_path, rounds=3, clients=4)
    enrolled = local.prepare(cfg, tmp_path)
    run_dir, port = tmp_path / "run", free_port()
    server = atoll_process("server", tmp_path / "exp.toml", "--port", port, "--host", "localhost",
                           "--certs", tmp_path / "certs", "--out", run_dir, log=tmp_path / "server.log")
    kill_on_exit(server)
    clients = []  # started at once: they retry with back-off until the server listens
    for e in enrolled:
        p = atoll_process("client", "--server", f"localhost:{port}", "--data", e["data"],
                          "--cert", e["cert"], log=tmp_path / f"{e['name']}.log")
        kill_on_exit(p)
        clients.append(p)
    algorithm, model, data, plan = config.build(cfg)
    sim = simulate(algorithm, model, data, plan, runtime=LoopRuntime())

    assert server.wait(60) == 0, (tmp_path / "server.log").read_text()
    for p, e in zip(clients, enrolled):
        assert p.wait(30) == 0, (tmp_path / f"{e['name']}.log").read_text()
        assert "3 updates accepted" in (tmp_path / f"{e['name']}.log").read_text()
    deployed = torch.load(run_dir / "model.pt")
    for k, v in sim.state.params.items():
        assert deployed[k].dtype == torch.float32
        assert torch.allclose(deployed[k], v, rtol=0, atol=1e-6), k
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2, 3]
    for got, want in zip(lines, sim.metrics):
        for key in ("clients_sampled", "clients_succeeded", "bytes_up", "bytes_down"):
            assert got[key] == want[key], key
        assert abs(got["train_loss"] - want["train_loss"]) < 1e-6
        assert abs(got["test_acc"] - want["test_acc"]) < 1e-9
    for name in ("checkpoint.pt", "final.json", "summary.md", "config.toml", "timings.jsonl"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "plots").glob("*.png"))
    assert json.loads((run_dir / "final.json").read_text())["rounds"] == 3
