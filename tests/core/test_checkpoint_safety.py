"""Files that execute (issue 12, section 6): checkpoints and client state files are loaded
without unpickling objects, every state atoll writes is loadable that way, and a torn last line
of metrics.jsonl does not stop a resume."""
import dataclasses
import io
import json

import pytest
import torch

from atoll import checkpoint, config
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

CALLS = []


def _record(*args):  # what a crafted file would run; here it only records that it ran
    CALLS.append(args)
    return {}


class _Payload:
    def __reduce__(self):
        return (_record, ("code ran on load",))


def _crafted(path, tree):
    buf = io.BytesIO()
    torch.save(tree, buf)
    path.write_bytes(buf.getvalue())


def test_crafted_checkpoint_runs_no_code(tmp_path):
    CALLS.clear()
    _crafted(tmp_path / "checkpoint.pt", {"format": 2, "round": 1, "params": _Payload(),
                                          "opt_state": (), "extra": {}, "client_states": {}})
    with pytest.raises(ValueError, match="checkpoint.pt"):
        checkpoint.load(tmp_path)
    assert CALLS == []


SMALL = """
rounds = 2
dtype = "float64"
[data]
name = "wine"
num_clients = 4
[model]
name = "mlp"
hidden = [4]
[client]
batch_size = 16
steps = 2
[checkpoint]
every = 1
[eval]
federated = false
"""
# every kind of state a run keeps: server optimizers, control variates, codec and tracker
# state, accountants of each privacy mode, and the vectorised runtime's ClientStore
STATES = {
    "fedadam": ["algorithm.name=fedadam"],
    "fedavgm": ["algorithm.name=fedavgm"],
    "scaffold": ["algorithm.name=scaffold"],
    "fednova": ["algorithm.name=fednova", "client.momentum=0.5"],
    "fedagrac": ["algorithm.name=fedagrac"],
    "adam_clients": ["client.optimizer=adam"],
    "error_feedback": ['comm.uplink={name="error_feedback", inner={name="top_k", fraction=0.3}}'],
    "downlink": ["comm.server_topk=0.5", "comm.downlink=client"],
    "dp_sgd": ["privacy.mode=dp_sgd", "privacy.sample_rate=0.2", "privacy.noise_multiplier=1.0"],
    "dp_fedavg": ["privacy.mode=dp_fedavg", "privacy.noise_multiplier=0.5",
                  "privacy.target_quantile=0.5", "privacy.clip_count_stddev=1.0",
                  "sampling.method=poisson", "sampling.rate=0.7"],
    "local": ["privacy.mode=local", "privacy.noise_multiplier=0.5"],
    "intrinsic": ["privacy.mode=intrinsic", "privacy.sample_rate=0.2", "privacy.step=20.0",
                  "privacy.clip=0.5", "client.steps=1"],
}


@pytest.mark.parametrize("runtime", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(STATES))
def test_every_state_is_plain_data_and_resumes(tmp_path, name, runtime):
    cfg = config.load(text=SMALL, overrides=STATES[name] + [f"runtime.name={runtime}"])

    def run(path, rounds, resume=False):
        alg, model, fed, plan = config.build(cfg)
        plan = dataclasses.replace(plan, rounds=rounds)
        return simulate(alg, model, fed, plan, run_dir=path, runtime=config.runtime(cfg),
                        resume=resume, plots=False)

    full = run(tmp_path / "full", 2)
    ck = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)  # raises otherwise
    assert ck["round"] == 2
    run(tmp_path / "cut", 1)
    resumed = run(tmp_path / "cut", 2, resume=True)
    assert (tmp_path / "cut/metrics.jsonl").read_text() == (tmp_path / "full/metrics.jsonl").read_text()
    for k in full.state.params:
        assert torch.equal(full.state.params[k], resumed.state.params[k]), k


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    cfg = config.load(text=SMALL)
    alg, model, fed, plan = config.build(cfg)
    simulate(alg, model, fed, dataclasses.replace(plan, rounds=1), run_dir=tmp_path / "cut",
             plots=False)
    with open(tmp_path / "cut/metrics.jsonl", "a") as f:
        f.write('{"round": 2, "train_loss": 0.4')  # disk full in the middle of round 2's line
    with open(tmp_path / "cut/timings.jsonl", "a") as f:
        f.write('{"round": 2, "wa')
    alg, model, fed, plan = config.build(cfg)
    simulate(alg, model, fed, plan, run_dir=tmp_path / "cut", resume=True, plots=False)
    alg, model, fed, plan = config.build(cfg)
    simulate(alg, model, fed, plan, run_dir=tmp_path / "full", plots=False)
    assert (tmp_path / "cut/metrics.jsonl").read_text() == (tmp_path / "full/metrics.jsonl").read_text()
    assert "torn" in caplog.text and "metrics.jsonl" in caplog.text


def test_a_corrupt_line_inside_the_log_is_an_error_naming_it(tmp_path):
    cfg = config.load(text=SMALL)
    alg, model, fed, plan = config.build(cfg)
    simulate(alg, model, fed, plan, run_dir=tmp_path, plots=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("garbage\n" + "\n".join(lines) + "\n")
    alg, model, fed, plan = config.build(cfg)
    with pytest.raises(ValueError, match=r"metrics.jsonl.*line 1"):
        simulate(alg, model, fed, plan, run_dir=tmp_path, resume=True, plots=False)


def test_vmap_store_checkpoint_is_plain_data(tmp_path):
    """A ClientStore's checkpoint (template, ids) loads under weights_only as well."""
    cfg = config.load(text=SMALL, overrides=STATES["error_feedback"])
    alg, model, fed, plan = config.build(cfg)
    simulate(alg, model, fed, plan, run_dir=tmp_path, runtime=VmapRuntime(), plots=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "client_store" in ck and json.loads(json.dumps(ck["client_store"]["folder"]))
