"""``Algorithm``: a frozen bundle of parts, and the server's half of a round.

An algorithm is ``(local_opt, uplink, aggregator, server_opt, downlink)`` plus three optional
hooks for algorithms that carry more than a model between rounds:

* ``client_fn(loss_fn, local_opt, grad_fn) -> ClientUpdate`` builds the client half
  (default ``local_training``; SCAFFOLD, FedaGrac, FedNova bring their own) on the gradient
  estimator ``grad_fn`` (``None``: the plain gradient of ``loss_fn``; DP-SGD's with
  ``estimator``), so privacy composes with every client half;
* ``client_init(params) -> dict`` the client's persistent state before its first round
  (control variates, previous local model, ...; default none). A runtime starts a client at
  ``new_client_state(params) = {"uplink": uplink.init(params), **client_init(params)}``;
* ``server_fn(state, agg, deltas, weights, aux, key) -> (agg, extra)`` rewrites the aggregated
  delta and the server's extra state from the clients' ``aux`` trees (FedNova's normalisation,
  server-side DP noise, ...). Entries of ``extra["broadcast"]`` are sent to every sampled
  client next to ``params``;
* ``server_aux(state, agg, aux_mean, cohort, extra) -> (agg, extra)`` the server's step for an
  algorithm that reads its clients' ``aux`` only through their weighted mean (with the
  aggregator's weights) and the cohort's size (SCAFFOLD's global control variate, FedaGrac's
  global gradient). Such an ``aux`` is linear: a private mode can clip and noise it with the
  delta and hand this hook the noisy mean over its fixed cohort (``algorithms.dp``);
* ``aux_spec(params) -> {name: (shape, dtype, low, high)}`` the ``aux`` tree a client sends:
  every entry, its shape, its dtype (``None``: the model's floating dtype, any floating dtype
  accepted and cast) and the closed range of its values. A deployed server refuses any other
  aux tree (``runtime.check``); default: no aux.

``server_round`` aggregates the decoded client deltas, applies ``server_fn``, turns the mean
delta into a pseudo-gradient ``-mean(delta)`` and lets the server optimizer step on it
(Reddi et al. 2021: ``sgd(1.0)`` is FedAvg, ``adam`` is FedAdam). Nothing here knows about
runtimes, files or the wire.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from atoll import tree as T
from atoll.aggregators import Aggregator, anomaly, mean
from atoll.client import ClientUpdate, LossFn, local_training, split_buffers
from atoll.codecs import Codec, identity
from atoll.transforms.base import Transform, apply_updates
from atoll.tree import Tree
from atoll.types import ServerState

ServerFn = Callable[..., tuple[Tree, dict[str, Any]]]


def _no_client_state(params: Tree) -> dict:
    return {}


AuxSpec = dict[str, tuple[tuple[int, ...], Any, float, float]]  # name: (shape, dtype, low, high)


def like_params(params: Tree) -> AuxSpec:
    """An aux tree with the model's entries and shapes, any finite value (SCAFFOLD, FedaGrac)."""
    return {k: (tuple(v.shape), None, -math.inf, math.inf) for k, v in params.items()}


@dataclass(frozen=True)
class Algorithm:
    name: str
    local_opt: Transform
    server_opt: Transform
    uplink: Codec = field(default_factory=identity)
    downlink: Codec = field(default_factory=identity)
    aggregator: Aggregator = field(default_factory=mean)
    client_fn: Callable[..., ClientUpdate] = local_training
    client_init: Callable[[Tree], dict] = _no_client_state
    server_fn: ServerFn | None = None
    server_aux: Callable[..., tuple[Tree, dict[str, Any]]] | None = None
    server_init: Callable[[Tree], dict] | None = None  # extra server state, e.g. {"broadcast": ...}
    # The privacy event of the noise ``server_fn`` adds each round (DP-FedAvg's Gaussian on the
    # sum), in the accountant's units; the client stages declare theirs (``uplink.event``,
    # ``aux_codec.event``, ``estimator.event``, ``secure.noise``). ``privacy_config.stage_events``
    # reads them all.
    server_event: Any = None
    aux_spec: Callable[[Tree], AuxSpec] = _no_client_state
    aux_codec: Codec = field(default_factory=identity)  # the client's aux on its way out (local DP)
    tracker: Any = None  # atoll.downlink.DeltaTracker: per-client sparse downlink (US 2025/0265475 A1)
    adversary: Callable | None = None  # simulation only: atoll.attacks.Adversary rewrites its clients' rows
    secure: Any = None  # atoll.secure.stage.SecureSum: the server learns only the cohort's sum
    # The client step loop's extension points: ``estimator(loss_fn)`` -> the gradient estimator
    # every client_fn steps on (default ``client.value_and_grad``; DP-SGD's clipped, noised sum),
    # and ``draw(x, y, cid, round, seed, work, params, secret)`` -> the round's batches (default
    # ``runtime.base.client_work``; DP-SGD's Poisson batches with pre-drawn noise).
    estimator: Callable | None = None
    draw: Callable | None = None
    # Personalized FL: ``personalize(params, client_state)`` -> the model that client uses (Ditto's
    # own ``v_i``, FedPer's global body with its own head); ``None``: the global model.
    personalize: Callable[[Tree, dict], Tree] | None = None
    # ``adapt(loss_fn, params, x, y)`` -> the model a client uses, made at evaluation from the
    # global ``params`` on its training data ``(x, y)`` (Per-FedAvg's steps of fine-tuning);
    # where set, evaluation uses it instead of ``personalize``.
    adapt: Callable[..., Tree] | None = None
    # Per-client copies in the downlink: ``client_copy(params, cid)`` -> the model client ``cid``
    # receives (its fingerprinted copy, ``atoll.watermark.FingerprintCopies``); its update is
    # taken against it and stepped into the unmarked global model. ``None``: one broadcast.
    client_copy: Callable[[Tree, int], Tree] | None = None

    def __post_init__(self):
        # Build-time checks that the parts fit together.
        if not isinstance(self.local_opt, Transform) or not isinstance(self.server_opt, Transform):
            raise TypeError(f"{self.name}: local_opt and server_opt must be Transforms")
        if self.client_copy is not None and self.tracker is not None:
            raise ValueError(f"{self.name}: per-client copies (client_copy) and per-client delta "
                             "downlink (tracker) both send each client its own model; use one")

    def init(self, params: Tree, buffers: tuple[str, ...] = ()) -> ServerState:
        """The state before round 1. ``buffers``: the entries of ``params`` that are model
        buffers (``client.buffer_names``), averaged each round but never stepped by the server
        optimizer (see ``server_round``)."""
        params = T.clone(params)
        extra = {"aggregator": self.aggregator.init(params)}
        if buffers:
            extra["buffers"] = tuple(buffers)
        if self.server_init is not None:
            extra.update(self.server_init(params))
        if self.tracker is not None:
            extra["tracker"] = self.tracker.init(params)
        trainable = split_buffers(params, buffers)[0] if buffers else params
        return ServerState(params=params, opt_state=self.server_opt.init(trainable), round=0,
                           extra=extra)

    def broadcast(self, state: ServerState) -> dict[str, Tree]:
        """What the server sends every sampled client this round."""
        return {"params": state.params, **state.extra.get("broadcast", {})}

    def client(self, loss_fn: LossFn) -> ClientUpdate:
        """The client half's pure update: ``client_fn(loss_fn, local_opt, grad_fn)``, with the
        algorithm's estimator where it has one."""
        grad_fn = self.estimator(loss_fn) if self.estimator is not None else None
        update = self.client_fn(loss_fn, self.local_opt, grad_fn)
        return update if isinstance(update, ClientUpdate) else ClientUpdate(update, loss_fn)

    def aux_names(self) -> list[str]:
        """The entries of the ``aux`` tree its clients send (``[]``: none), read off
        ``aux_spec`` with a one-entry probe model."""
        return sorted(self.aux_spec({"w": torch.zeros(1)}))

    def new_client_state(self, params: Tree) -> dict:
        """A client's state before its first round."""
        return {"uplink": self.uplink.init(params), **self.client_init(params)}

    def server_round(self, state: ServerState, deltas: Tree | None, weights: torch.Tensor | None,
                     aux: Tree | None = None, key: int = 0, ids: list[int] = (),
                     cohort: int | None = None) -> ServerState:
        """Apply one round of decoded client deltas ``(C, ...)``; ``None`` = nobody succeeded.
        ``aux``: the clients' stacked aux trees ``(C, ...)``; ``key``: the round's server key
        (``rng.key(seed, round, rng.SERVER, "server")``); ``ids``: the clients of the rows;
        ``cohort``: how many clients the rows hold (default one each; a secure sum's row holds
        its bucket)."""
        if deltas is None:
            extra = state.extra
            if self.tracker is not None:
                extra = {**extra, "tracker": self.tracker.commit(extra["tracker"], state.params, state.params)}
            return ServerState(state.params, state.opt_state, state.round + 1, extra)
        if self.adversary is not None:
            deltas = self.adversary(deltas, list(ids), state.round + 1, key)
        agg_in = state.extra["aggregator"]
        if self.aggregator.prepare is not None:  # e.g. FLTrust's own update on its root data
            agg_in = self.aggregator.prepare(agg_in, state.params, key)
        agg, agg_state = self.aggregator.aggregate(deltas, weights, agg_in)
        extra = {**state.extra, "aggregator": agg_state}
        if self.aggregator.needs_individual:  # per-client scores: the run folder's anomaly.jsonl
            extra["anomaly"] = {"round": state.round + 1, **anomaly.report(
                self.aggregator.name, deltas, weights, agg, agg_state, ids)}
        if self.server_fn is not None:
            agg, extra = self.server_fn(state, agg, deltas, weights, aux or {}, key, extra)
        if self.server_aux is not None:
            mean_aux = T.weighted_sum(aux, weights / weights.sum())
            agg, extra = self.server_aux(state, agg, mean_aux, cohort or weights.shape[0], extra)
        params, opt_state = self._step(state, agg)
        if self.tracker is not None:
            extra["tracker"] = self.tracker.commit(extra["tracker"], state.params, params)
        return ServerState(params, opt_state, state.round + 1, extra)

    def _step(self, state: ServerState, agg: Tree) -> tuple[Tree, Any]:
        """The server optimizer's step on ``-agg``; buffers (``extra["buffers"]``) take the
        aggregated delta as it is (FedAvg's average of the clients' running statistics)."""
        names = state.extra.get("buffers", ())
        if not names:
            updates, opt_state = self.server_opt.update(T.scale(agg, -1.0), state.opt_state,
                                                        state.params, {})
            return apply_updates(state.params, updates), opt_state
        params, bufs = split_buffers(state.params, names)
        updates, opt_state = self.server_opt.update(T.scale(split_buffers(agg, names)[0], -1.0),
                                                    state.opt_state, params, {})
        params = {**apply_updates(params, updates), **T.add(bufs, split_buffers(agg, names)[1])}
        return {k: params[k] for k in state.params}, opt_state
