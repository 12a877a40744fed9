"""Personalized evaluation (docs/personalization.md): each training client's own model on its
own test split, and new clients (held out of training) on theirs.

A client's own model is ``Algorithm.personalize(params, client_state)`` (Ditto's ``v_i``,
FedPer's and FedRep's global body with its own head; the global model for an algorithm without
the hook). A client not yet sampled uses the model of a fresh client state. An algorithm with
``Algorithm.adapt`` (Per-FedAvg) instead makes each client's model at evaluation from the global
model on the client's training split. A new client first runs ``finetune`` rounds of the
algorithm's own client update on its training split (batches keyed by ``(seed, finetune pass,
client)``, so the same run gives the same numbers), from the global model; ``finetune = 0``
evaluates the fresh state's model as it is (``adapt``: adapts the model it ends with).

The summary: ``pers_acc_mean`` (sample-weighted, as ``fed_acc_mean``) and ``pers_acc_p10``
(10th percentile over clients), and the same for new clients (``new_acc_*``).
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from atoll import rng
from atoll import tree as T
from atoll.evaluate import per_sample
from atoll.runtime.base import draw_work


def states_of(client_states, ids: list[int]) -> dict[int, dict]:
    """The stored states of those of ``ids`` that have one: from a dict (loop runtime) or a
    ``runtime.store.ClientStore`` (vectorised runtime)."""
    if isinstance(client_states, dict):
        return {i: client_states[i] for i in ids if i in client_states}
    written = set(client_states.written_ids().tolist())
    have = [i for i in ids if i in written]
    if not have:
        return {}
    stacked = client_states.get(have)
    return {cid: tree_map(lambda t, j=j: t[j], stacked) for j, cid in enumerate(have)}


def own_model(algorithm, params, cstate):
    if algorithm.personalize is None:
        return params
    return algorithm.personalize(params, cstate if cstate is not None else algorithm.new_client_state(params))


def fine_tuned(algorithm, client_update, state, cdata, cid, passes, work, seed):
    """A new client's model after ``passes`` rounds of its own update from the global model."""
    broadcast = algorithm.broadcast(state)
    params, cstate = state.params, algorithm.new_client_state(state.params)
    mine = params
    for t in range(passes):
        start = params if algorithm.personalize is not None else mine
        batches, mask, _ = draw_work(algorithm.draw, cdata, cid, t + 1, rng.fold(seed, "finetune"),
                                     work, start)
        key = rng.key(seed, t + 1, cid, "finetune")
        with rng.torch_seeded(key):
            res = client_update(start, cstate, {**broadcast, "params": start}, batches, mask, key)
        cstate, mine = res.client_state, T.add(start, res.delta)
    if algorithm.adapt is not None:
        return adapted(algorithm, client_update, mine, cdata, cid, seed)
    return own_model(algorithm, params, cstate) if algorithm.personalize is not None else mine


def adapted(algorithm, client_update, params, cdata, cid, seed):
    """``Algorithm.adapt`` from ``params`` on the client's training split (a model that draws
    random numbers draws them keyed by ``(seed, client)``)."""
    dtype = next(iter(params.values())).dtype
    with rng.torch_seeded(rng.key(seed, 0, cid, "adapt")):
        return algorithm.adapt(client_update.loss, params, cdata.x.to(dtype), cdata.y)


def evaluate(algorithm, client_update, model, state, client_states, clients, trained: int,
             finetune: int, work, seed: int) -> dict[str, float]:
    """The summary over clients ``[0, trained)`` (own models) and ``[trained, N)`` (new)."""
    ids = list(range(trained))
    stored = states_of(client_states, ids)
    if algorithm.adapt is not None:
        own = {i: adapted(algorithm, client_update, state.params, clients[i], i, seed) for i in ids}
    else:
        own = {i: own_model(algorithm, state.params, stored.get(i)) for i in ids}
    out = _summary("pers", model, clients, own)
    new = {i: fine_tuned(algorithm, client_update, state, clients[i], i, finetune, work, seed)
           for i in range(trained, len(clients))}
    return {**out, **(_summary("new", model, clients, new) if new else {})}


def _summary(prefix: str, model, clients, models: dict) -> dict[str, float]:
    correct, sizes, accs = 0.0, 0, []
    for i, params in models.items():
        c = clients[i]
        if c.y_test.shape[0] == 0:
            continue
        dtype = next(iter(params.values())).dtype
        _, hit = per_sample(model, params, c.x_test.to(dtype), c.y_test)
        correct, sizes = correct + float(hit.sum()), sizes + hit.numel()
        accs.append(float(hit.mean()))
    if not accs:
        return {}
    return {f"{prefix}_acc_mean": correct / sizes,
            f"{prefix}_acc_p10": float(torch.quantile(torch.tensor(accs, dtype=torch.float64), 0.1))}
