"""Every bad update is rejected with its reason and the round goes on with the good ones: the
model after the round equals the reference runtime's round over the honest clients alone."""
import json

import torch

from atoll import config, sampling
from atoll import tree as T
from atoll.client import model_loss
from atoll.deploy import local
from atoll.deploy.client import credentials
from atoll.deploy.coordinator import downlink_bytes
from atoll.deploy.server import Server
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.round import client_round
from atoll.transport import wire
from atoll.transport.grpc.client import Connection

from .conftest import ServerThread, small_config


def test_bad_updates_are_rejected_without_harming_the_round(tmp_path):
    cfg = small_config(tmp_path, rounds=1, clients=8, per_round=7, timeout=60)
    enrolled = local.prepare(cfg, tmp_path, tokens=True)
    server = Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="localhost",
                    port=0, auth="token", plots=False, linger_s=0)
    thread = ServerThread(server)
    algorithm, model, data, plan = config.build(cfg)
    update = algorithm.client(model_loss(model))
    cohort = sampling.sample(8, 1, cfg.seed, count=7)
    outsider = next(c for c in range(8) if c not in cohort)
    nan_c, shape_c, big_c, int_c, honest = cohort[0], cohort[1], cohort[2], cohort[3], cohort[4:]

    conns = {e["id"]: Connection(f"localhost:{server.port}", timeout=30,
                                 **credentials(ca=e["ca"], token=e["token"])) for e in enrolled}
    assert [conns[c].join()["client_id"] for c in range(8)] == list(range(8))
    tasks = {c: conns[c].get_task(5) for c in cohort}
    assert all(t.kind == "TASK" and t.round == 1 for t in tasks.values())

    def honest_update(c):
        msg, _, metrics, _ = client_round(algorithm, update, tasks[cohort[0]].data, None,
                                                 data.clients[c], c, 1, plan.work, plan.seed)
        return msg, {"num_examples": data.clients[c].n, "loss": float(metrics["loss"]),
                     "samples": float(metrics["samples"])}

    def tampered(c, change):
        msg, head = honest_update(c)
        parts = T.split(wire.loads(msg))
        return wire.dumps(T.join({"delta": change(parts["delta"]), "aux": {}})), head

    def send(c, msg, head, task_id=None):
        return conns[c].submit(1, task_id or tasks.get(c, tasks[cohort[0]]).task_id, msg, **head)

    first = next(iter(model.state_dict()))
    limit = server.coordinator.max_update_bytes
    bad = {
        nan_c: tampered(nan_c, lambda d: {**d, first: d[first] * float("nan")}),
        shape_c: tampered(shape_c, lambda d: {**d, first: d[first][:1]}),
        big_c: tampered(big_c, lambda d: {**d, "padding": torch.zeros(limit // 4 + 1)}),
        int_c: tampered(int_c, lambda d: {**d, first: d[first].to(torch.int32)}),
    }
    replies = {c: send(c, *bad[c]) for c in bad}
    assert replies[nan_c] == (False, f"update entry '{first}' is not finite (NaN or inf)")
    assert not replies[shape_c][0] and "shape" in replies[shape_c][1]
    assert replies[big_c] == (False, f"update exceeds the size limit of {limit} bytes")
    assert not replies[int_c][0] and "dtype torch.int32" in replies[int_c][1]
    forged = send(honest[1], *honest_update(honest[1]), task_id="0" * 32)
    assert forged == (False, f"task id does not match round 1's task for client {honest[1]} (replayed update)")
    outsider_reply = send(outsider, *honest_update(outsider))
    assert outsider_reply == (False, f"client {outsider} was not sampled in round 1")
    good = {c: honest_update(c) for c in honest}
    assert send(honest[0], *good[honest[0]]) == (True, "")
    replay = send(honest[0], *good[honest[0]])  # before the last answer, which closes the round
    assert replay == (False, f"client {honest[0]} already answered round 1 (replayed update)")
    assert all(send(c, *good[c]) == (True, "") for c in honest[1:])
    thread.join(30)

    ref, _, _ = LoopRuntime().run_round(algorithm, update, algorithm.init(dict(model.named_parameters())),
                                        {}, honest, data, plan.work, plan.seed)
    for k, v in ref.params.items():
        assert torch.equal(server.coordinator.state.params[k], v), k
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["clients_sampled"] == 7 and line["clients_succeeded"] == 3
    reasons = " | ".join(why for _, why in line["failures"])
    for word in ("not finite", "shape", "size limit", "dtype", "task id", "not sampled", "already answered"):
        assert word in reasons, word
    for c in conns.values():
        c.close()


def test_late_update_is_discarded_and_counted(tmp_path):
    cfg = small_config(tmp_path, rounds=2, clients=2, timeout=3.0)
    enrolled = local.prepare(cfg, tmp_path, tokens=True)
    server = Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="localhost",
                    port=0, auth="token", plots=False, linger_s=0)
    thread = ServerThread(server)
    algorithm, model, data, plan = config.build(cfg)
    update = algorithm.client(model_loss(model))
    conns = [Connection(f"localhost:{server.port}", **credentials(ca=e["ca"], token=e["token"]))
             for e in enrolled]
    down = downlink_bytes(algorithm, algorithm.init(dict(model.named_parameters())), cfg.seed)
    client_round(algorithm, update, down, None, data.clients[0], 0, 1, plan.work, plan.seed)
    answers = []  # (the call above warms up torch.func, so round 1 is answered well in time)
    for r in (1, 2):
        tasks = [c.get_task(5) for c in conns]
        assert [t.round for t in tasks] == [r, r]
        msg, _, m, _ = client_round(algorithm, update, tasks[0].data, None, data.clients[0],
                                           0, r, plan.work, plan.seed)
        head = {"num_examples": data.clients[0].n, "loss": float(m["loss"]), "samples": float(m["samples"])}
        answers.append(conns[0].submit(r, tasks[0].task_id, msg, **head))
        if r == 1:  # client 1 never answers round 1: the deadline closes it
            late_task = tasks[1]
        else:   # client 1's round-1 answer arrives during round 2
            answers.append(conns[1].submit(1, late_task.task_id, msg, **head))
            msg1, _, m1, _ = client_round(algorithm, update, tasks[1].data, None,
                                                 data.clients[1], 1, 2, plan.work, plan.seed)
            answers.append(conns[1].submit(2, tasks[1].task_id, msg1, num_examples=data.clients[1].n,
                                           loss=float(m1["loss"]), samples=float(m1["samples"])))
    thread.join(30)
    assert answers == [(True, ""), (True, ""), (False, "late: round 1 is closed"), (True, "")]
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["clients_succeeded"] for m in lines] == [1, 2]
    assert "late_answers" not in lines[0] and lines[1]["late_answers"] == 1
