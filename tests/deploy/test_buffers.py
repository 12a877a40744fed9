"""Deployment with a BatchNorm + dropout model: the server's round over real messages equals
the reference runtime's (running statistics averaged, dropout from each client's key)."""
import torch

from atoll import config, sampling
from atoll.client import buffer_names, model_loss, params_of
from atoll.deploy import local
from atoll.deploy.client import credentials
from atoll.deploy.server import Server
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.round import client_round
from atoll.transport.grpc.client import Connection

from .conftest import ServerThread, small_config


def test_deployed_round_with_batchnorm_and_dropout_equals_the_loop_runtime(tmp_path):
    cfg = small_config(tmp_path, rounds=1, clients=3)
    text = (tmp_path / "exp.toml").read_text() + "[model.kwargs]\nbatch_norm = true\ndropout = 0.2\n"
    (tmp_path / "exp.toml").write_text(text)
    cfg = config.load(tmp_path / "exp.toml")
    enrolled = local.prepare(cfg, tmp_path, tokens=True)
    server = Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="localhost",
                    port=0, auth="token", plots=False, linger_s=0)
    thread = ServerThread(server)
    algorithm, model, data, plan = config.build(cfg)
    update = algorithm.client(model_loss(model))
    conns = {e["id"]: Connection(f"localhost:{server.port}", timeout=30,
                                 **credentials(ca=e["ca"], token=e["token"])) for e in enrolled}
    cohort = sampling.sample(3, 1, cfg.seed, count=3)
    assert [conns[c].join()["client_id"] for c in range(3)] == [0, 1, 2]
    for c in cohort:  # what a deployed client runs (atoll.deploy.client)
        task = conns[c].get_task(5)
        msg, _, m, _ = client_round(algorithm, update, task.data, None, data.clients[c], c,
                                           1, plan.work, plan.seed)
        assert conns[c].submit(1, task.task_id, msg, num_examples=data.clients[c].n,
                               loss=float(m["loss"]), samples=float(m["samples"])) == (True, "")
    thread.join(30)
    ref, _, stats = LoopRuntime().run_round(
        algorithm, update, algorithm.init(params_of(model), buffers=buffer_names(model)), {},
        cohort, data, plan.work, plan.seed)
    assert stats.succeeded == 3
    got = server.coordinator.state.params
    assert set(got) == set(ref.params) and "1.running_var" in got
    for k, v in ref.params.items():
        assert torch.equal(got[k], v), k
    for c in conns.values():
        c.close()
