"""The fast runtimes' uplink: one real wire message per client, read back in place or copied,
validated with the loop runtime's reasons."""
from dataclasses import replace

import pytest
import torch

from atoll import sampling
from atoll import tree as T
from atoll.runtime.check import decode_update
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.round import client_round
from atoll.runtime.base import RoundStats
from atoll.runtime.decode import DecodeBuffers
from atoll.runtime.round import broadcast_bytes, close_round
from atoll.runtime.vmap import VmapRuntime
from atoll.transport import wire
from tests.runtime.test_equivalence import assert_same, build, run


def _round(fused, over=()):
    alg, model, fed, plan = build(over)
    from atoll.client import model_loss, params_of
    update = alg.client(model_loss(model))
    state = alg.init(params_of(model))
    cohort = sampling.sample(len(fed.clients), 1, plan.seed, count=plan.clients_per_round)
    down = broadcast_bytes(alg, state, plan.seed, 1)
    outcomes = VmapRuntime(fused=fused, chunk_clients=4).train(
        alg, update, down, [None] * len(cohort), cohort, fed, plan.work, plan.seed, 1)
    return alg, update, state, fed, plan, down, outcomes


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_every_message_is_the_dumps_of_the_loop_clients_tree(fused):
    alg, update, state, fed, plan, down, outcomes = _round(fused)
    assert any(isinstance(o.message, memoryview) for o in outcomes)  # rows of one buffer
    for o in outcomes:
        tree = wire.loads(o.message)
        assert bytes(o.message) == wire.dumps(tree)
        ref, _, _, _ = client_round(alg, update, down, None, fed.clients[o.cid], o.cid, 1,
                                           plan.work, plan.seed)
        expect = wire.loads(ref)
        assert len(ref) == len(o.message) and list(expect) == list(tree)
        for k in tree:
            torch.testing.assert_close(tree[k], expect[k], rtol=0, atol=1e-12)


def _spy_in_place(monkeypatch):
    seen, real = [], wire._in_place
    monkeypatch.setattr(wire, "_in_place", lambda *a: seen.append(real(*a)[0] is not None) or real(*a))
    return seen


@pytest.mark.parametrize("over", [[], ["client.steps=3", "client.stragglers=0.0"]],
                         ids=["stragglers", "equal-steps"])
def test_rows_of_one_buffer_are_read_in_place(monkeypatch, over):
    ref = run(LoopRuntime(), over)  # (separate messages: the loop runtime's are never in place)
    seen = _spy_in_place(monkeypatch)
    assert_same(ref, run(VmapRuntime(chunk_clients=4), over))
    assert seen and all(seen)


def test_messages_from_a_failed_chunk_are_copied(monkeypatch):
    from atoll.runtime.fused import FusedMLP

    def boom(*args, **kwargs):
        raise RuntimeError("chunk failed")

    monkeypatch.setattr(FusedMLP, "run", boom)  # every chunk goes client by client: bytes
    ref = run(LoopRuntime())
    seen = _spy_in_place(monkeypatch)
    assert_same(ref, run(VmapRuntime(chunk_clients=4)))
    assert seen and not any(seen)


def test_a_message_of_another_layout_gets_the_loop_reason():
    alg, update, state, fed, plan, down, outcomes = _round(True)
    good = T.split(wire.loads(outcomes[1].message))["delta"]
    bad = dict(good)
    bad["extra"] = torch.zeros(2)
    wrong = {k: v.reshape(-1) for k, v in good.items()}
    outcomes[1] = replace(outcomes[1], message=wire.dumps(T.join({"delta": bad, "aux": {}})))
    outcomes[2] = replace(outcomes[2], message=wire.dumps(T.join({"delta": wrong, "aux": {}})))
    reasons = {}
    for o in outcomes[1:3]:
        with pytest.raises(ValueError) as exc:
            decode_update(alg, o.message, state.params)
        reasons[o.cid] = str(exc.value)
    stats = RoundStats(sampled=len(outcomes))
    new, accepted = close_round(alg, state, outcomes, fed, plan.work, stats, plan.seed, DecodeBuffers())
    assert dict(stats.failures) == reasons
    assert sorted(c for c, _ in accepted) == sorted(o.cid for o in outcomes if o.cid not in reasons)
    assert stats.bytes_up == sum(len(o.message) for o in outcomes)
    assert new.round == 1 and all(torch.isfinite(v).all() for v in new.params.values())
