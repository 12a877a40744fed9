"""[privacy] in deployment: the server charges the simulation's accountant each round, writes
epsilon in the metrics, stops before the round that would exceed the budget; the clients clip and
noise their own updates (local DP) with noise the server cannot regenerate from the seed."""
import json

import torch

from atoll import config
from atoll.deploy import local
from atoll.runtime.loop import LoopRuntime
from atoll.simulation import simulate

from .conftest import atoll_process, free_port, small_config

PRIVACY = '\n[privacy]\nmode = "local"\nclip = 1.0\nnoise_multiplier = 2.0\n'


def test_deployed_run_spends_the_budget_as_the_simulation_does(tmp_path, kill_on_exit):
    cfg = small_config(tmp_path, rounds=4, clients=4)
    path = tmp_path / "exp.toml"
    path.write_text(path.read_text() + PRIVACY)
    eps = [m["epsilon"] for m in simulate(*config.build(config.load(path)), runtime=LoopRuntime()).metrics]
    path.write_text(path.read_text() + f"target_epsilon = {(eps[1] + eps[2]) / 2}\n")  # 2 rounds fit
    cfg = config.load(path)
    enrolled = local.prepare(cfg, tmp_path)
    run_dir, port = tmp_path / "run", free_port()
    server = atoll_process("server", path, "--port", port, "--host", "localhost",
                           "--certs", tmp_path / "certs", "--out", run_dir, log=tmp_path / "server.log")
    kill_on_exit(server)
    for e in enrolled:
        kill_on_exit(atoll_process("client", "--server", f"localhost:{port}", "--data", e["data"],
                                   "--cert", e["cert"], log=tmp_path / f"{e['name']}.log"))
    sim = simulate(*config.build(cfg), runtime=LoopRuntime())
    assert server.wait(60) == 0, (tmp_path / "server.log").read_text()

    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    assert [m["epsilon"] for m in lines] == [m["epsilon"] for m in sim.metrics] == eps[:2]
    final = json.loads((run_dir / "final.json").read_text())
    assert "stopped after round 2" in final["privacy"]["stopped"]
    assert all(m["train_loss"] is None for m in lines)  # private clients send no loss
    # the clients' noise came from their own secrets, not from the seed the server sent: the
    # deployed model is the simulation's up to independent noise (one client's std z * 2 * clip
    # = 4 per coordinate, over a cohort of 4: about 2 per round), not equal to it
    deployed = torch.load(run_dir / "model.pt")
    diff = torch.cat([(deployed[k] - v).reshape(-1) for k, v in sim.state.params.items()])
    assert bool(torch.isfinite(diff).all()) and float(diff.pow(2).mean().sqrt()) > 1.0
