"""RayRuntime (2 local workers) against LoopRuntime: float64, fixed keys, tolerance 1e-9.
Skipped only when Ray is not importable (install the extra: pip install 'atoll[ray]')."""
import pytest

ray = pytest.importorskip("ray")

from atoll.runtime.loop import LoopRuntime  # noqa: E402
from atoll.runtime.ray import RayRuntime, shard  # noqa: E402

from .test_equivalence import ALGORITHMS, assert_same, run  # noqa: E402


@pytest.fixture(scope="module")
def ray_runtime():
    rt = RayRuntime(workers=2, threads=1)
    yield rt
    rt.shutdown()


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_ray_equals_loop(ray_runtime, name):
    over = ALGORITHMS[name] + ["client.drop_stragglers=true"] * (name == "fedavg")
    assert_same(run(LoopRuntime(), over), run(ray_runtime, over))
    assert len(ray_runtime.actors) == 2 and ray_runtime.startup_s is not None


def test_shards_balance_samples_and_keep_order():
    parts = shard([5, 9, 2, 7], [100, 1, 50, 60], 2)
    assert sorted(i for p in parts for i in p) == [0, 1, 2, 3]
    assert all(p == sorted(p) for p in parts)
    assert {tuple(p) for p in parts} == {(0, 1), (2, 3)}  # 101 and 110 samples


def test_local_start_is_retried_once_then_reported():
    from atoll.runtime.ray import start_local

    class FakeRay:
        def __init__(self, failures):
            self.failures, self.calls, self.shutdowns = failures, 0, 0

        def init(self, **kwargs):
            self.calls += 1
            if self.calls <= self.failures:
                raise Exception("The current node timed out during startup.")

        def shutdown(self):
            self.shutdowns += 1

    once = FakeRay(1)
    start_local(once, 2)
    assert (once.calls, once.shutdowns) == (2, 1)
    always = FakeRay(5)
    with pytest.raises(RuntimeError, match="did not start after 2 attempts: The current node"):
        start_local(always, 2)
    assert always.calls == 2


def test_messages_pack_into_one_array_and_back():
    from atoll.runtime.ray import pack_messages, unpack_messages
    from atoll.runtime.base import Outcome

    msgs = [b"abc", None, b"", bytes(range(200))]
    outs = [Outcome(i, 10 + i, m, None, 0.0, 1.0, False, None if m is not None else "failed")
            for i, m in enumerate(msgs)]
    packed, blob = pack_messages(outs)
    assert blob.nbytes == 203
    back = unpack_messages(packed, blob)
    assert [None if o.message is None else bytes(o.message) for o in back] == msgs
    assert all(o.message is None or o.message.readonly for o in back)


@pytest.mark.parametrize("extra", [["model.kwargs.batch_norm=true"], ["model.kwargs.dropout=0.3"]],
                         ids=["batchnorm", "dropout"])
def test_ray_equals_loop_for_models_with_buffers_or_dropout(ray_runtime, extra):
    over = extra + ["rounds=2"]
    loop = run(LoopRuntime(), over)
    assert_same(loop, run(ray_runtime, over))
    assert all(m["clients_succeeded"] == 6 for m in loop.metrics)
