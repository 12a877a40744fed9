"""Reference models: shapes, purity under torch.func, and ``build`` by name or import path."""
import pytest
import torch
from torch.func import functional_call, vmap

from atoll import models
from atoll.models import CNN, build


@pytest.mark.parametrize("name,kw", [("logreg", {}), ("mlp", {}), ("mlp", {"hidden": (7,)}),
                                     ("mlp", {"hidden": 5}), ("cnn", {}),
                                     ("cnn", {"channels": (4, 6)})])
def test_output_shapes(name, kw):
    m = build(name, 64, 10, **kw)
    assert m(torch.randn(5, 64)).shape == (5, 10)
    assert not list(m.buffers())


def test_mlp_layers():
    m = build("mlp", 12, 3, hidden=(8, 6))
    linears = [l for l in m if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(12, 8), (8, 6), (6, 3)]


def test_cnn_takes_flat_rows_and_images():
    m = models.cnn()
    x = torch.randn(4, 64)
    out = m(x)
    assert out.shape == (4, 10)
    assert torch.equal(out, m(x.reshape(4, 1, 8, 8)))
    assert build("cnn", 256, 3)(torch.randn(2, 256)).shape == (2, 3)  # 16x16 images
    with pytest.raises(ValueError, match="side"):
        build("cnn", 60, 10)


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_functional_call_under_vmap(name):
    torch.manual_seed(0)
    m = build(name, 64, 10, **({"hidden": (16,)} if name == "mlp" else {}))
    clients = [{k: torch.randn_like(v) for k, v in m.named_parameters()} for _ in range(3)]
    stacked = {k: torch.stack([c[k] for c in clients]) for k in clients[0]}
    x = torch.randn(3, 5, 64)
    out = vmap(lambda p, xb: functional_call(m, p, (xb,)))(stacked, x)
    for c in range(3):
        ref = functional_call(m, clients[c], (x[c],))
        # random weights give logits of several hundred (cnn) whose float32 rounding depends on
        # the kernel (AVX2, AVX-512, ...): the tolerance scales with the magnitude and dtype
        tol = 100 * torch.finfo(ref.dtype).eps * float(ref.abs().max())
        torch.testing.assert_close(out[c], ref, rtol=0, atol=tol)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_batch_norm_and_dropout_options(name):
    m = build(name, 64, 10, batch_norm=True, dropout=0.25)
    kinds = {type(x).__name__ for x in m.modules()}
    assert {"Dropout"} <= kinds and kinds & {"BatchNorm1d", "BatchNorm2d"}
    assert {k.rsplit(".", 1)[-1] for k, _ in m.named_buffers()} == {
        "running_mean", "running_var", "num_batches_tracked"}
    assert m(torch.randn(5, 64)).shape == (5, 10)
    assert not list(build(name, 64, 10).buffers())


def test_build_import_path_with_kwargs_only():
    # torch.nn.Linear names neither n_features nor n_classes: it gets only the kwargs
    m = build("torch.nn:Linear", 64, 10, in_features=3, out_features=2, bias=False)
    assert isinstance(m, torch.nn.Linear)
    assert (m.in_features, m.out_features, m.bias) == (3, 2, None)


def test_build_import_path_receives_shape_when_named():
    m = build("atoll.models.zoo:CNN", 64, 7, channels=(2, 3))
    assert isinstance(m, CNN) and m(torch.randn(1, 64)).shape == (1, 7)
    m = build("atoll.models.zoo:mlp", 9, 4, hidden=(5,))
    assert m(torch.randn(2, 9)).shape == (2, 4)


def test_build_errors():
    with pytest.raises(ValueError, match="cnn.*logreg.*mlp"):
        build("resnet", 64, 10)
    with pytest.raises(ValueError, match="no_such_pkg.mod"):
        build("no_such_pkg.mod:Net", 64, 10)
    with pytest.raises(ValueError, match="torch.nn:NoSuchLayer"):
        build("torch.nn:NoSuchLayer", 64, 10)
    with pytest.raises(TypeError):
        build("mlp", 64, 10, depth=3)
