"""FLTrust's server update: the clients' local training, run by the server on its root data.

``root_update(model, local_opt, clients, n, seed, batch_size, steps, epochs)`` draws ``n`` root
samples once (key ``(seed, 0, SERVER, "root")``), uniformly from the union of the clients'
training data, as in Cao et al.'s (NDSS 2021) default setting, and returns
``server_update(params, key) -> delta`` for ``aggregators.fltrust``: the same optimizer, batch
size and steps (or epochs) as a client, batches drawn from the round's server key.
"""
from __future__ import annotations

import torch

from atoll import rng
from atoll.client import local_training, model_loss
from atoll.data.batching import batch_indices, gather


def draw_root(clients, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples drawn without replacement from the union of the clients' training data."""
    xs, ys = torch.cat([c.x for c in clients]), torch.cat([c.y for c in clients])
    if not 0 < n <= ys.shape[0]:
        raise ValueError(f"{n} root samples asked of {ys.shape[0]} training samples")
    pick = torch.randperm(ys.shape[0], generator=rng.generator(rng.key(seed, 0, rng.SERVER, "root")))[:n]
    return xs[pick], ys[pick]


def root_update(model, local_opt, clients, n: int, seed: int, batch_size: int,
                steps: int | None, epochs: int | None):
    x, y = draw_root(clients, n, seed)
    update = local_training(model_loss(model), local_opt)

    def server_update(params, key):
        idx = batch_indices(n, batch_size, steps=steps, epochs=None if steps else epochs,
                            generator=rng.generator(rng.fold(key, "fltrust")))
        xb, yb, mask = gather(x, y, idx)
        res = update(params, {}, {"params": params}, {"x": xb, "y": yb, "mask": mask},
                     torch.ones(idx.shape[0], dtype=torch.bool), key)
        return res.delta

    return server_update
