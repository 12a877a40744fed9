"""The [comm] section end to end: codecs on the uplink, seed 004 on the server and downlink."""
import pytest
import torch

from atoll import config
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

BASE = """
rounds = 6
dtype = "float64"
[data]
name = "digits"
num_clients = 12
partition = "dirichlet"
alpha = 0.3
[model]
name = "mlp"
hidden = [16]
[client]
lr = 0.05
batch_size = 10
[sampling]
clients_per_round = 4
[eval]
every = 3
federated = false
"""


def _run(tmp, overrides=(), runtime=None):
    cfg = config.load(text=BASE, overrides=list(overrides))
    alg, model, data, plan = config.build(cfg)
    return simulate(alg, model, data, plan, run_dir=tmp, runtime=runtime or LoopRuntime(), plots=False)


def test_server_topk_of_everything_with_client_deltas_is_fedavg(tmp_path):
    plain = _run(tmp_path / "a")
    seed4 = _run(tmp_path / "b", ["comm.server_topk=1.0", 'comm.downlink="client"'])
    for k, v in plain.state.params.items():
        assert torch.equal(v, seed4.state.params[k])
    # the first broadcast to a client is the dense model, later ones at most that
    assert all(b["bytes_down"] <= a["bytes_down"] for a, b in zip(plain.metrics, seed4.metrics))


def test_seed004_downlink_is_sparse_and_runtimes_agree(tmp_path):
    over = ['comm.uplink="rand_k(0.05)"', "comm.server_topk=0.02", 'comm.downlink="client"']
    loop = _run(tmp_path / "loop", over)
    vm = _run(tmp_path / "vmap", over, VmapRuntime())
    for a, b in zip(loop.metrics, vm.metrics):
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
    for k, v in loop.state.params.items():
        assert torch.allclose(v, vm.state.params[k], atol=1e-9)
    assert loop.metrics[-1]["ratio_up"] > 5  # rand-k 5% in float64: values and leaf headers, the indices are a seed
    # 2% of the coordinates change per round, but a first-time client receives the dense model
    assert loop.metrics[-1]["ratio_down"] > 1.5


def test_anchor_broadcast_reaches_every_client(tmp_path):
    over = ["comm.server_topk=0.02", 'comm.downlink="initial"']
    no_anchor = _run(tmp_path / "a", over)
    anchored = _run(tmp_path / "b", over + ["comm.anchor_every=3"])
    a, b = no_anchor.metrics, anchored.metrics
    assert a[0]["bytes_down"] == b[0]["bytes_down"]
    assert b[3]["bytes_down"] > a[3]["bytes_down"]  # after 3 rounds: an anchor to all 12
    assert b[5]["bytes_down"] < a[5]["bytes_down"]  # afterwards deltas are relative to it


@pytest.mark.parametrize("bad, needle", [
    (['comm.uplink="top_kk(0.1)"'], "top_k"),
    (["comm.anchor_every=3"], "comm.anchor_every"),
    (["comm.server_topk_momentum=0.5"], "comm.server_topk"),
])
def test_bad_comm_config_is_named(bad, needle):
    cfg = config.load(text=BASE, overrides=bad)
    with pytest.raises(config.ConfigError, match=needle):
        config.build(cfg)
