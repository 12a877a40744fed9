"""Models with buffers (BatchNorm) and dropout (issue 12, section 7): trained in train mode,
evaluated in eval mode, buffers averaged by the server, the same in every runtime."""
import dataclasses

import pytest
import torch

from atoll import algorithms, config, models, transforms
from atoll.client import buffer_names, model_loss, params_of
from atoll.evaluate import per_sample
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

from .test_equivalence import BASE, assert_same

BN = ["model.kwargs.batch_norm=true"]
DROP = ["model.kwargs.dropout=0.3"]


def run(runtime, overrides, base=BASE):
    alg, model, fed, plan = config.build(config.load(text=base, overrides=list(overrides)))
    res = simulate(alg, model, fed, plan, runtime=runtime, plots=False)
    res.data = fed
    return res


def test_batchnorm_mlp_trains_on_digits():
    """Before the fix every client failed in every round and the run showed the untrained
    model's accuracy (about 0.1)."""
    res = run(VmapRuntime(), BN + ["rounds=5"], open("examples/quickstart/digits.toml").read())
    assert all(m["clients_succeeded"] == m["clients_sampled"] == 10 for m in res.metrics)
    assert res.final["test_acc"] >= 0.9
    var = res.state.params["1.running_var"]
    assert not torch.allclose(var, torch.ones_like(var))  # the running statistics moved
    # each round every client runs one epoch of ceil(n / 10) batches: the server's count
    # grows by the sample-weighted mean of those
    n = torch.tensor([c.n for c in res.data.clients], dtype=torch.float64)
    want = 5 * float((n * torch.ceil(n / 10)).sum() / n.sum())
    assert float(res.state.params["1.num_batches_tracked"]) == pytest.approx(want, rel=1e-6)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("extra", [
    BN, DROP, pytest.param(BN + DROP, marks=SLOW, id="both"),
    pytest.param(BN + ["algorithm.name=fedadam", "algorithm.server_lr=0.05"], marks=SLOW,
                 id="batchnorm-fedadam"),
    pytest.param(BN + ["algorithm.name=scaffold"], marks=SLOW, id="batchnorm-scaffold"),
    pytest.param(BN + ["algorithm.name=fedagrac"], marks=SLOW, id="batchnorm-fedagrac")])
def test_vmap_equals_loop(extra):
    extra = extra + ["rounds=2"]
    loop = run(LoopRuntime(), extra)
    runtime = VmapRuntime(chunk_clients=4)
    assert_same(loop, run(runtime, extra))
    assert runtime._engine[1].name == ("per-client" if DROP[0] in extra else "vmap")
    assert all(m["clients_succeeded"] == 6 for m in loop.metrics)


def test_dropout_is_drawn_in_training_from_the_client_key():
    plain, drop = run(LoopRuntime(), ["rounds=1"]), run(LoopRuntime(), DROP + ["rounds=1"])
    again = run(LoopRuntime(), DROP + ["rounds=1"])
    assert_same(drop, again)  # reproducible
    assert drop.metrics[0]["train_loss"] != pytest.approx(plain.metrics[0]["train_loss"], abs=1e-3)


def test_evaluation_runs_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = models.build("mlp", 6, 3, hidden=[16], batch_norm=True, dropout=0.5).double()
    params, x, y = params_of(model), torch.randn(7, 6, dtype=torch.float64), torch.arange(7) % 3
    params["1.running_mean"] = torch.linspace(-1, 1, 16, dtype=torch.float64)
    first, again = per_sample(model, params, x, y), per_sample(model, params, x, y)
    assert torch.equal(first[0], again[0])  # no dropout
    one = per_sample(model, params, x[:1], y[:1])  # BatchNorm1d would refuse one sample in train mode
    assert torch.allclose(one[0], first[0][:1], rtol=1e-12, atol=0)
    model.load_state_dict(params)
    model.eval()
    want = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    assert torch.allclose(first[0], want, rtol=1e-12, atol=0)  # the tree's running statistics
    model.train()
    per_sample(model, params, x, y)
    assert all(m.training for m in model.modules())
    loss = model_loss(model)
    assert loss(params, x, y, torch.ones(7, dtype=torch.bool)) != loss(params, x, y, torch.ones(7, dtype=torch.bool))


def test_loss_does_not_write_the_buffers_it_is_given():
    torch.manual_seed(0)
    model = models.build("mlp", 6, 3, hidden=[16], batch_norm=True).double()
    params, x, y = params_of(model), torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 3
    before = {k: v.clone() for k, v in params.items()}
    loss, new = model_loss(model).with_buffers(params, x, y, torch.ones(8, dtype=torch.bool))
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert set(new) == set(buffer_names(model)) and float(new["1.num_batches_tracked"]) == 1.0
    torch.testing.assert_close(new["1.running_mean"], 0.1 * (x @ params["0.weight"].T + params["0.bias"]).mean(0))


def test_server_averages_buffers_and_steps_only_parameters():
    """FedAdam steps the parameters; the running statistics take the clients' weighted mean
    (Adam's normalised step would move a variance by ~lr whatever the clients reported)."""
    torch.manual_seed(0)
    model = models.build("mlp", 4, 3, hidden=[5], batch_norm=True).double()
    alg = algorithms.fedadam(transforms.sgd(0.1), server_lr=0.5)
    state = alg.init(params_of(model), buffers=buffer_names(model))
    deltas = {k: torch.randn(3, *v.shape, dtype=torch.float64) for k, v in state.params.items()}
    w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    new = alg.server_round(state, deltas, w)
    for k in buffer_names(model):
        want = state.params[k] + (w.view(-1, *[1] * (deltas[k].dim() - 1)) * deltas[k]).sum(0) / w.sum()
        torch.testing.assert_close(new.params[k], want, rtol=1e-12, atol=1e-12)
    mean = state.params["0.weight"] + (w.view(-1, 1, 1) * deltas["0.weight"]).sum(0) / w.sum()
    assert (new.params["0.weight"] - mean).abs().max() > 0.1  # Adam's step, not the average
    assert list(new.params) == list(state.params)


@pytest.mark.parametrize("mode", [["privacy.mode=dp_sgd", "privacy.sample_rate=0.1"],
                                  ["privacy.mode=intrinsic", "privacy.sample_rate=0.1",
                                   "privacy.step=20.0"]])
def test_per_sample_privacy_modes_refuse_batchnorm_naming_the_model(mode):
    over = BN + mode + ["privacy.noise_multiplier=1.0"] * ("privacy.mode=dp_sgd" in mode)
    with pytest.raises(config.ConfigError, match=r"model Sequential has buffers \['1.running_mean'"):
        config.build(config.load(text=BASE, overrides=over))


def test_resume_keeps_the_buffers_apart(tmp_path):
    """The buffer names live in the checkpointed state: a resumed FedAdam run is the same run."""
    over = BN + ["algorithm.name=fedadam", "algorithm.server_lr=0.05"]
    alg, model, fed, plan = config.build(config.load(text=BASE, overrides=over))
    whole = simulate(alg, model, fed, plan, runtime=VmapRuntime(), plots=False)
    short = dataclasses.replace(plan, rounds=2)
    simulate(alg, model, fed, short, run_dir=tmp_path, runtime=VmapRuntime(), plots=False)
    resumed = simulate(alg, model, fed, plan, run_dir=tmp_path, runtime=VmapRuntime(),
                       resume=True, plots=False)
    assert resumed.state.extra["buffers"] == ("1.running_mean", "1.running_var", "1.num_batches_tracked")
    for k, v in whole.state.params.items():
        torch.testing.assert_close(resumed.state.params[k], v, rtol=0, atol=1e-12)


def test_torch_seeded_is_reproducible_and_restores_the_global_generator():
    from atoll import rng

    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    with rng.torch_seeded(7):
        a = torch.nn.functional.dropout(torch.ones(64), 0.5)
    with rng.torch_seeded(7):
        b = torch.nn.functional.dropout(torch.ones(64), 0.5)
    with rng.torch_seeded(8):
        c = torch.nn.functional.dropout(torch.ones(64), 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.rand(4), want)  # the caller's stream is untouched
