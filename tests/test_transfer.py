"""Transfer learning from a model file: ``[model] init / init_only / freeze`` (docs/transfer.md).
The pretrained entries are loaded on the server side only, checked entry by entry, and frozen
entries never move in any runtime."""
import pickle
from types import SimpleNamespace

import pytest
import torch

from atoll import config, models
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

BASE = """
rounds = 2
dtype = "float64"
[data]
name = "digits"
num_clients = 4
[model]
name = "mlp"
hidden = [16]
{model}
[client]
lr = 0.1
steps = 3
[eval]
federated = false
"""


def source(tmp, hidden=16, poison=False):
    m = models.build("mlp", 64, 10, seed=7, hidden=[hidden])
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    if poison:
        state["0.bias"][0] = float("nan")
    torch.save(state, tmp / "src.pt")
    return state


def build(model="", data=None):
    return config.build(config.load(text=BASE.format(model=model)), data=data)


def test_init_only_loads_the_named_entries_and_keeps_the_rest_fresh(tmp_path):
    src = source(tmp_path)
    _, fresh, _, _ = build()
    _, model, _, _ = build(f'init = "{tmp_path / "src.pt"}"\ninit_only = ["0."]')
    got = dict(model.named_parameters())
    for k, v in fresh.named_parameters():
        want = src[k].to(v.dtype) if k.startswith("0.") else v
        assert torch.equal(got[k].detach(), want.detach()), k
    _, model, _, _ = build(f'init = "{tmp_path / "src.pt"}"')  # default: every entry
    assert all(torch.equal(p.detach(), src[k].double()) for k, p in model.named_parameters())


@pytest.mark.parametrize("runtime", [LoopRuntime, VmapRuntime])
def test_frozen_entries_never_move(tmp_path, runtime):
    source(tmp_path)
    alg, model, fed, plan = build(f'init = "{tmp_path / "src.pt"}"\nfreeze = ["0."]')
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    res = simulate(alg, model, fed, plan, runtime=runtime(), plots=False)
    for k, v in before.items():
        moved = not torch.equal(res.state.params[k], v)
        assert moved == (not k.startswith("0.")), k


@pytest.mark.parametrize("model, words", [
    ('init = "{d}/none.pt"', "does not exist"),
    ('init = "{d}/small.pt"', "entry '0.weight' should have shape (16, 64), got (8, 64)"),
    ('init = "{d}/nan.pt"', "entry '0.bias' holds NaN"),
    ('init = "{d}/evil.pt"', "not a model state dict"),
    ('init = "{d}/huge.pt"', "more than a model file may hold"),  # refused before it is read
    ('init = "{d}/src.pt"\ninit_only = ["body."]', "no parameter of the model starts with ['body.']"),
    ('freeze = ["body."]', "model.freeze = ['body.']: no parameter"),
    ('init_only = ["0."]', "model.init_only is set but model.init"),
])
def test_bad_model_files_and_names_are_refused_naming_what_is_wrong(tmp_path, model, words):
    source(tmp_path)
    (tmp_path / "small").mkdir()
    small = source(tmp_path / "small", hidden=8)
    torch.save(small, tmp_path / "small.pt")
    (tmp_path / "nan").mkdir()
    torch.save(source(tmp_path / "nan", poison=True), tmp_path / "nan.pt")

    class Evil:  # unpickling it would run code: weights_only refuses it before
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"0.weight": Evil()}))
    with open(tmp_path / "huge.pt", "wb") as fh:  # 3 GiB, sparse: no disk, and never loaded
        fh.truncate(3 * 2**30)
    with pytest.raises(config.ConfigError) as info:
        build(model.format(d=tmp_path))
    assert words in str(info.value)


def test_a_deployed_client_never_opens_the_path_the_server_names(tmp_path):
    """The client builds from the server's config with its own data shape: it receives the
    model each round, so it never reads ``model.init`` (a path on the server's machine)."""
    shape = SimpleNamespace(n_features=64, n_classes=10, clients=[None] * 4)
    _, model, _, _ = build(f'init = "{tmp_path}/secret/none.pt"\nfreeze = ["0."]', data=shape)
    _, fresh, _, _ = build(data=shape)  # no error above: the file was not opened; model as built
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
