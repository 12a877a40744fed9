"""The vectorised runtime's draws and padded batches equal ``client_work``'s, client by client."""
import itertools

import pytest
import torch

from atoll.data import ClientData
from atoll.runtime.base import LocalWork, client_work
from atoll.runtime.work import chunk_batches, cut_chunks, plan_clients


class _Data:
    def __init__(self, sizes, features=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.clients = [ClientData(torch.randn(n, features, generator=g), torch.randint(0, 5, (n,), generator=g),
                                   torch.zeros(0, features), torch.zeros(0, dtype=torch.long)) for n in sizes]


@pytest.mark.parametrize("big", [False, True], ids=["concatenated", "per-client"])
@pytest.mark.parametrize("work", [LocalWork(batch_size=4, epochs=2, stragglers=0.6),
                                  LocalWork(batch_size=3, epochs=None, steps=7, stragglers=0.3),
                                  LocalWork(batch_size=10, epochs=1)], ids=["epochs", "steps", "plain"])
def test_chunks_reproduce_client_work(work, big, monkeypatch):
    if big:
        monkeypatch.setattr("atoll.runtime.work.SMALL_CHUNK_BYTES", 0)
    data = _Data([0, 1, 2, 4, 5, 9, 12, 3, 17])
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
