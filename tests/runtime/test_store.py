"""ClientStore round trips (in memory and memory-mapped) and per-client state through the
vectorised runtime: a stateful uplink codec gives the loop runtime's states and results."""
import os

import pytest
import torch
from torch.utils._pytree import tree_flatten

from atoll import algorithms, sampling, transforms
from atoll.codecs import Codec
from atoll.runtime.base import LocalWork
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.store import ClientStore
from atoll.runtime.vmap import VmapRuntime

TEMPLATE = {"a": torch.full((4,), 0.5), "b": {"c": torch.zeros(2, 3, dtype=torch.float64)},
            "n": torch.zeros((), dtype=torch.int64)}


def _rows(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(k, 4, generator=g), "b": {"c": torch.randn(k, 2, 3, generator=g).double()},
            "n": torch.randint(0, 9, (k,), generator=g)}


@pytest.mark.parametrize("limit", [2**30, 0], ids=["memory", "memmap"])
def test_round_trip_100k_clients(tmp_path, limit):
    store = ClientStore(100_000, TEMPLATE, path=tmp_path / "s", memory_limit_bytes=limit)
    assert store.on_disk == (limit == 0)
    ids = [3, 99_999, 50_000, 7]
    rows = _rows(4)
    store.put(ids, rows)
    got = store.get([7, 3, 11, 99_999])
    assert torch.equal(got["a"][0], rows["a"][3]) and torch.equal(got["a"][1], rows["a"][0])
    assert torch.equal(got["b"]["c"][3], rows["b"]["c"][1]) and int(got["n"][0]) == int(rows["n"][3])
    assert torch.equal(got["a"][2], TEMPLATE["a"]) and torch.equal(got["b"]["c"][2], TEMPLATE["b"]["c"])
    assert store.written() == 4
    if store.on_disk:  # sparse files: 100,000 x 88 bytes reserved, a few pages written
        used = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "s").iterdir())
        assert used < store.nbytes / 10


def test_bad_puts_name_the_problem():
    store = ClientStore(10, TEMPLATE)
    with pytest.raises(ValueError, match="structure"):
        store.put([1], {"a": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="leaf 0"):
        store.put([1, 2], _rows(1))
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        store.get([10])
    with pytest.raises(TypeError, match="tensor"):
        ClientStore(10, {"a": 1.0})


def residual_codec(step=2.0**-6):
    """Quantise ``delta + residual`` to a grid and keep the rounding error (error feedback)."""
    def encode(tree, state, key):
        corrected = {k: v + state[k] for k, v in tree.items()}
        payload = {k: torch.round(v / step) * step for k, v in corrected.items()}
        return payload, {k: corrected[k] - payload[k] for k in tree}

    return Codec("residual", init=lambda p: {k: torch.zeros_like(v) for k, v in p.items()},
                 encode=encode, decode=dict, linear=True, unbiased=False)


def test_store_backed_states_equal_loop_states(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).double()
    from atoll.client import model_loss, params_of
    from atoll.data import ClientData, FederatedData
    g = torch.Generator().manual_seed(1)
    clients = [ClientData(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g),
                          torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)) for n in (3, 9, 14, 6, 1, 11)]
    data = FederatedData("toy", clients, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 5, 3)
    alg = algorithms.fedavg(transforms.sgd(0.1), uplink=residual_codec())
    update = alg.client(model_loss(model))
    params = params_of(model)
    work = LocalWork(batch_size=4, epochs=2, stragglers=0.5)
    store = ClientStore(6, {"uplink": alg.uplink.init(params)}, path=tmp_path / "st", memory_limit_bytes=0)
    results = {}
    for name, runtime, states in (("loop", LoopRuntime(), {}), ("vmap", VmapRuntime(chunk_clients=2), store)):
        state = alg.init(params)
        for r in range(1, 4):
            cohort = sampling.sample(6, r, 0, count=4)
            state, states, _ = runtime.run_round(alg, update, state, states, cohort, data, work, 0)
        results[name] = (state, states)
    (loop_state, loop_states), (vm_state, vm_store) = results["loop"], results["vmap"]
    for k in params:
        torch.testing.assert_close(vm_state.params[k], loop_state.params[k], rtol=0, atol=1e-9)
    ids = sorted(loop_states)
    assert vm_store.written() == len(ids)
    got = vm_store.get(ids)["uplink"]
    for i, cid in enumerate(ids):
        for k in params:
            torch.testing.assert_close(got[k][i], loop_states[cid]["uplink"][k], rtol=0, atol=1e-9)


@pytest.mark.parametrize("limit", [2**30, 0], ids=["memory", "files"])
def test_checkpoint_saves_store_rows_not_client_dicts(tmp_path, limit):
    from atoll import checkpoint
    from atoll.types import ServerState

    store = ClientStore(50_000, TEMPLATE, path=tmp_path / "live", memory_limit_bytes=limit)
    ids = [49_999, 3, 777, 12]
    store.put(ids, _rows(4))
    state = ServerState({"w": torch.ones(3)}, (), 7, {})
    checkpoint.BLOCK_BYTES, old = 200, checkpoint.BLOCK_BYTES  # several blocks of rows
    try:
        checkpoint.save(tmp_path / "run", state, store)
        assert (tmp_path / "run/checkpoint.clients-7").is_dir()
        assert (tmp_path / "run/checkpoint.pt").stat().st_size < 4000  # no per-client objects
        back_state, back = checkpoint.load(tmp_path / "run", store_path=tmp_path / "restored")
    finally:
        checkpoint.BLOCK_BYTES = old
    assert back_state.round == 7 and isinstance(back, ClientStore) and back.on_disk == store.on_disk
    assert back.num_clients == 50_000 and back.written_ids().tolist() == sorted(ids)
    probe = ids + [0, 25_000]
    for a, b in zip(tree_flatten(store.get(probe))[0], tree_flatten(back.get(probe))[0]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    store.put([5], _rows(1, seed=2))  # the next checkpoint replaces the folder of round 7
    checkpoint.save(tmp_path / "run", ServerState(state.params, (), 8, {}), store)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.clients-8", "checkpoint.pt"]


@pytest.mark.parametrize("limit", [2**30, 0], ids=["memory", "files"])
def test_resume_with_a_store_gives_the_uninterrupted_metrics(tmp_path, limit):
    from dataclasses import replace

    from tests.runtime.test_equivalence import build

    from atoll.simulation import simulate

    def parts():  # afresh for every run: simulate writes the final parameters into the model
        alg, model, data, plan = build(["rounds=5", "client.stragglers=0.0"])
        return replace(alg, uplink=residual_codec()), model, data, replace(plan, checkpoint_every=2)

    class StoreRuntime(VmapRuntime):  # keeps client states in a ClientStore from round 1
        def __init__(self, crash_at=None):
            super().__init__(chunk_clients=4)
            self.crash_at = crash_at

        def run_round(self, algorithm, update, state, states, *args):
            if state.round == self.crash_at:
                raise KeyboardInterrupt
            if not isinstance(states, ClientStore):
                states = ClientStore(len(args[1].clients), algorithm.new_client_state(state.params),
                                     memory_limit_bytes=limit)
            return super().run_round(algorithm, update, state, states, *args)

    full = simulate(*parts(), run_dir=tmp_path / "full", runtime=StoreRuntime(), plots=False)
    with pytest.raises(KeyboardInterrupt):
        simulate(*parts(), run_dir=tmp_path / "cut", runtime=StoreRuntime(crash_at=3), plots=False)
    resumed = simulate(*parts(), run_dir=tmp_path / "cut", runtime=StoreRuntime(), resume=True,
                       plots=False)
    assert (tmp_path / "cut/metrics.jsonl").read_bytes() == (tmp_path / "full/metrics.jsonl").read_bytes()
    for k in full.state.params:
        assert torch.equal(full.state.params[k], resumed.state.params[k])
    assert (tmp_path / "cut/checkpoint.clients-5").is_dir()


def test_vmap_runtime_keeps_per_client_state_in_a_store(tmp_path):
    """A run whose algorithm has per-client tensors (SCAFFOLD's control variates) gets a
    ClientStore from the vectorised runtime, checkpointed as rows, with the loop's results."""
    from atoll import config
    from atoll.runtime.loop import LoopRuntime
    from atoll.simulation import simulate

    text = """
rounds = 4
dtype = "float64"
[data]
name = "wine"
num_clients = 6
[model]
name = "logreg"
[algorithm]
name = "scaffold"
[sampling]
clients_per_round = 3
[checkpoint]
every = 2
"""
    runs = {}
    for name, rt in (("loop", LoopRuntime()), ("vmap", VmapRuntime())):
        alg, model, data, plan = config.build(config.load(text=text))
        runs[name] = simulate(alg, model, data, plan, run_dir=tmp_path / name, runtime=rt, plots=False)
    for k, v in runs["loop"].state.params.items():
        assert torch.allclose(v, runs["vmap"].state.params[k], atol=1e-9)
    assert (tmp_path / "vmap/checkpoint.clients-4").is_dir()  # rows, not a dict per client
    assert not (tmp_path / "loop/checkpoint.clients-4").exists()
