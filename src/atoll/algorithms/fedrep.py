"""FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers") and
FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated
Learning"): the model's head stays on the client.

The head is every entry whose name starts with ``head`` (a parameter-name prefix; default the
last layer: the module of the last trained entry, e.g. ``"4."`` of the MLP). Client i keeps its
head in its client state (the initial global head before its first round). Each round it puts
its head on the received body and trains, then sends the body's delta and a head delta of
exact zeros: no head value leaves the client, the server's mean of the head is zero and its
head never moves. FedPer trains body and head together; FedRep first trains the head for
``head_epochs`` passes over the round's batches with the body frozen, then the body with the
head frozen. FedBN (Li et al. 2021) is the same client half with every batch-norm layer
(weights and running statistics) as the local part; LG-FedAvg (Liang et al. 2020) with
everything but the head.
"""
from __future__ import annotations

import torch

from atoll.algorithm import Algorithm
from atoll.client import run_steps, value_and_grad
from atoll.transforms import Transform, chain, frozen, sgd
from atoll.types import ClientResult

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def head_names(params, prefix: str | None) -> list[str]:
    """The head's entries of ``params``: those starting with ``prefix`` (``None``: the last
    layer's). ValueError if the head is empty or the whole model (nothing would be shared)."""
    if prefix is None:
        last = [k for k in params if not k.endswith(_BUFFER_SUFFIXES)][-1]
        prefix = last.rsplit(".", 1)[0] + "." if "." in last else ""  # a one-layer model: all of it
    names = [k for k in params if k.startswith(prefix)]
    if not names or len(names) == len(params):
        raise ValueError(f"head prefix {prefix!r} selects {len(names)} of the model's "
                         f"{len(params)} entries; it must select some but not all")
    return names


def norm_names(params) -> list[str]:
    """FedBN's local entries: every entry of a layer with running statistics (BatchNorm's
    weight, bias, running mean and variance, batch count). ValueError if the model has none."""
    layers = {k[: -len("running_mean")] for k in params if k.endswith("running_mean")}
    names = [k for k in params if any(k.startswith(p) for p in layers)]
    if not names:
        raise ValueError("fedbn: the model has no batch-norm layer (no entry *running_mean)")
    return names


def fedper(local_opt: Transform | None = None, head: str | None = None, server_lr: float = 1.0,
           **parts) -> Algorithm:
    return _local_head("fedper", local_opt, head, 0, server_lr, parts)


def fedrep(local_opt: Transform | None = None, head: str | None = None, head_epochs: int = 1,
           server_lr: float = 1.0, **parts) -> Algorithm:
    if head_epochs < 1:
        raise ValueError(f"fedrep: head_epochs must be >= 1, got {head_epochs}")
    return _local_head("fedrep", local_opt, head, head_epochs, server_lr, parts)


def fedbn(local_opt: Transform | None = None, server_lr: float = 1.0, **parts) -> Algorithm:
    """FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
    Normalization"): FedPer's client half with the batch-norm layers as the local part."""
    return _local_head("fedbn", local_opt, norm_names, 0, server_lr, parts)


def lg_fedavg(local_opt: Transform | None = None, head: str | None = None, server_lr: float = 1.0,
              **parts) -> Algorithm:
    """LG-FedAvg (Liang et al. 2020, "Think Locally, Act Globally: Federated Learning with Local
    and Global Representations"): the complement of FedPer, the head is shared and the rest
    (the representation) stays on the client."""

    def body(params):
        names = head_names(params, head)
        return [k for k in params if k not in names]

    return _local_head("lg_fedavg", local_opt, body, 0, server_lr, parts)


def _local_head(name, local_opt, head, head_epochs, server_lr, parts) -> Algorithm:
    local = head if callable(head) else (lambda params: head_names(params, head))

    def client_fn(loss_fn, opt, grad_fn=None):
        grad_fn = grad_fn or value_and_grad(loss_fn)

        def update(params, client_state, broadcast, batches, step_mask, key):
            names = local(params)
            body = [k for k in params if k not in names]
            p, ctx = {**params, **client_state["head"]}, {"broadcast": broadcast, "key": key}
            for _ in range(head_epochs):  # FedRep: the head first, body frozen
                p, _ = run_steps(grad_fn, chain(opt, frozen(body)), p, batches, step_mask, ctx)
            p, metrics = run_steps(grad_fn, chain(opt, frozen(names)) if head_epochs else opt, p,
                                   batches, step_mask, ctx)
            delta = {k: torch.zeros_like(v) if k in names else p[k] - v for k, v in params.items()}
            state = {**client_state, "head": {k: p[k] for k in names}}
            return ClientResult(delta, {}, state, metrics)

        return update

    def client_init(params):
        return {"head": {k: params[k].clone() for k in local(params)}}

    return Algorithm(name, local_opt or sgd(0.05), sgd(server_lr), client_fn=client_fn,
                     client_init=client_init, personalize=personal_model, **parts)


def personal_model(params, client_state):
    """The model a client uses: the global body with its own head."""
    return {**params, **client_state["head"]}
