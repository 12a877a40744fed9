"""``lstm_lm``: the hand-unrolled LSTM equals ``torch.nn.LSTM`` with the same weights, is pure
under ``torch.func.vmap``, and trains the same in the loop and vmap runtimes (float64)."""
import pytest
import torch
from torch.func import functional_call, vmap

from atoll import config
from atoll.data import ClientData, FederatedData
from atoll.models import build
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate


def test_equals_torch_lstm_with_the_same_weights():
    m = build("lstm_lm", 5, 13, embed=4, hidden=6).double()
    ref = torch.nn.LSTM(4, 6, batch_first=True).double()
    with torch.no_grad():
        ref.weight_ih_l0.copy_(m.gates_x.weight)
        ref.bias_ih_l0.copy_(m.gates_x.bias)
        ref.weight_hh_l0.copy_(m.gates_h.weight)
        ref.bias_hh_l0.zero_()
    x = torch.randint(0, 13, (9, 5))
    with torch.no_grad():
        h, _ = ref(m.embed(x))
        want, got = m.out(h[:, -1]), m(x.double())
    assert got.shape == (9, 13)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_vocab_kwarg_and_bad_sizes():
    assert build("lstm_lm", 3, 10, vocab=20).embed.num_embeddings == 20
    with pytest.raises(ValueError, match="lstm_lm"):
        build("lstm_lm", 0, 10)


def test_pure_under_vmap():
    m = build("lstm_lm", 4, 11, embed=3, hidden=5).double()
    clients = [{k: torch.randn_like(v) for k, v in m.named_parameters()} for _ in range(3)]
    stacked = {k: torch.stack([c[k] for c in clients]) for k in clients[0]}
    x = torch.randint(0, 11, (6, 4)).double()
    out = vmap(lambda p: functional_call(m, p, (x,)))(stacked)
    for i, c in enumerate(clients):
        want = functional_call(m, c, (x,))
        assert torch.allclose(out[i], want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


def test_loop_and_vmap_runtimes_agree():
    g = torch.Generator().manual_seed(0)

    def rows(n):
        return torch.randint(0, 12, (n, 3), generator=g).double(), torch.randint(1, 12, (n,), generator=g)

    x, y = rows(60)
    parts = zip(x.split([10, 20, 30]), y.split([10, 20, 30]))
    fed = FederatedData("toy", [ClientData(a, b, *rows(4)) for a, b in parts], *rows(8), 3, 12)
    cfg = config.validate({"rounds": 2, "dtype": "float64", "model": {"name": "lstm_lm",
                           "kwargs": {"embed": 4, "hidden": 5}}, "client": {"lr": 0.5, "batch_size": 8},
                           "eval": {"federated": False}})
    out = []
    for runtime in (LoopRuntime(), VmapRuntime()):
        alg, model, data, plan = config.build(cfg, data=fed)
        out.append(simulate(alg, model, data, plan, runtime=runtime, plots=False).state.params)
    for k, v in out[0].items():
        assert torch.allclose(out[1][k], v, rtol=1e-9, atol=1e-9 * max(1.0, float(v.abs().max()))), k
