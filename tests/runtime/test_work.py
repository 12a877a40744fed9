"""The vectorised runtime's draws and padded batches equal ``client_work``'s, client by client."""
import itertools

import pytest
import torch

from atoll.data import ClientData
from atoll.runtime.base import LocalWork, client_work
from atoll.runtime.work import chunk_batches, cut_chunks, plan_clients, pooled


class _Data:
    def __init__(self, sizes, features=3, seed=0, pool=False):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(sum(sizes), features, generator=g), torch.randint(0, 5, (sum(sizes),), generator=g)
        if not pool:  # separate tensors per client
            x, y = [t.clone() for t in x.split(sizes)], [t.clone() for t in y.split(sizes)]
        else:         # views of one tensor, as data.build lays them out
            x, y = x.split(sizes), y.split(sizes)
        self.clients = [ClientData(a, b, torch.zeros(0, features), torch.zeros(0, dtype=torch.long))
                        for a, b in zip(x, y)]


def test_pooled_detects_views_of_one_tensor():
    views, copies = _Data([3, 1, 4], pool=True), _Data([3, 1, 4])
    (x, y), start = pooled([c.x for c in views.clients], [c.y for c in views.clients])
    assert start.tolist() == [0, 3, 4] and x.shape == (8, 3) and y.shape == (8,)
    assert pooled([c.x for c in copies.clients], [c.y for c in copies.clients]) is None
    assert pooled([c.x for c in views.clients[:1]] + [copies.clients[1].x],
                  [c.y for c in views.clients[:2]]) is None       # one client not in the pool
    empty = _Data([3, 0, 4], pool=True)
    assert pooled([c.x for c in empty.clients], [c.y for c in empty.clients]) is None


@pytest.mark.parametrize("big", [False, True, "pool"], ids=["concatenated", "per-client", "pooled"])
@pytest.mark.parametrize("work", [LocalWork(batch_size=4, epochs=2, stragglers=0.6),
                                  LocalWork(batch_size=3, epochs=None, steps=7, stragglers=0.3),
                                  LocalWork(batch_size=10, epochs=1)], ids=["epochs", "steps", "plain"])
def test_chunks_reproduce_client_work(work, big, monkeypatch):
    if big is True:
        monkeypatch.setattr("atoll.runtime.work.SMALL_CHUNK_BYTES", 0)
    data = _Data([0, 1, 2, 4, 5, 9, 12, 3, 17], pool=big == "pool")
    cohort = [8, 0, 3, 5, 1, 7, 2, 6, 4]
    for r, seed in itertools.product((1, 5), (0, 3)):
        plans = plan_clients(cohort, data, r, seed, work)
        for chunk in cut_chunks(plans, 4):
            batches, step_mask = chunk_batches(chunk, data.clients, work.batch_size)
            for c, p in enumerate(chunk):
                cd = data.clients[p.cid]
                ref, ref_mask, straggler = client_work(cd.x, cd.y, p.cid, r, seed, work)
                s = ref_mask.shape[0]
                assert p.straggler == straggler and p.steps == s
                assert torch.equal(step_mask[c, :s], ref_mask) and not step_mask[c, s:].any()
                for k in ("x", "y", "mask"):
                    assert torch.equal(batches[k][c, :s], ref[k]), (k, p.cid)
                assert not batches["mask"][c, s:].any()
