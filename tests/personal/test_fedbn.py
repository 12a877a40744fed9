"""FedBN: the batch-norm layers (weights and running statistics) stay on their client."""
import pytest
import torch

from atoll import algorithms as A
from atoll import config
from atoll import tree as T
from atoll.algorithms.fedrep import norm_names
from atoll.client import model_loss, params_of
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.round import broadcast_bytes, client_round
from atoll.simulation import simulate
from atoll.transforms import sgd
from atoll.transport import wire

BN = """
rounds = 3
dtype = "float64"
[data]
name = "wine"
num_clients = 6
partition = "shards"
shards_per_client = 1
client_test_fraction = 0.4
[model]
name = "mlp"
hidden = [8]
kwargs = {batch_norm = true}
[algorithm]
name = "fedbn"
[client]
lr = 0.1
batch_size = 8
[sampling]
clients_per_round = 3
[eval]
personal = true
"""

NORM = ("1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")


def test_norm_layers_are_the_local_part():
    cfg = config.load(text=BN)
    alg, model, data, plan = config.build(cfg)
    assert sorted(norm_names(params_of(model))) == sorted(NORM)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        A.fedbn(sgd(0.1)).new_client_state({"0.weight": torch.zeros(2), "2.weight": torch.zeros(2)})


def test_fedbn_never_sends_or_averages_norm_layers():
    cfg = config.load(text=BN)
    alg, model, data, plan = config.build(cfg)
    init = params_of(model, torch.float64)
    state = alg.init(init, buffers=tuple(k for k, _ in model.named_buffers()))
    update = alg.client(model_loss(model))
    message, new, _, _ = client_round(alg, update, broadcast_bytes(alg, state, 0, 1),
                                      None, data.clients[0], 0, 1, plan.work, 0)
    sent = T.split(wire.loads(message))["delta"]
    assert all(torch.equal(sent[k], torch.zeros_like(sent[k])) for k in NORM)
    assert float(sent["0.weight"].abs().max()) > 0  # the shared layers do go up
    assert float((new["head"]["1.running_mean"] - init["1.running_mean"]).abs().max()) > 1e-3
    res = simulate(alg, model, data, plan, runtime=LoopRuntime(), plots=False)
    for k in NORM:  # the server's norm layers never moved
        assert torch.equal(res.state.params[k], init[k])
    assert 0.0 <= res.final["pers_acc_mean"] <= 1.0
