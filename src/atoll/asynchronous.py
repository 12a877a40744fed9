"""Asynchronous training on the simulated clock: FedAsync and FedBuff.

An event-driven driver. Up to ``concurrency`` clients train at once; whenever slots are free
(after all events of the current instant), a *wave* fills them with idle, online clients in
the order of the seeded permutation ``randperm(N)`` of ``rng.key(seed, wave, SERVER,
"sample")`` (the synchronous sampler's draw). A client's job has two events: *upload* after its
download and ``K_i`` steps, *arrive* after its upload of its real message bytes
(``atoll.devices``; without devices every duration is zero and events keep dispatch order).

Clients dispatched on the same model version share one broadcast message and are trained
together, lazily, when the first of them uploads (one ``runtime.train`` call on the vectorised
runtime; the loop runtime's client path otherwise); the group id is the ``round`` of their
keys. The server half is the Algorithm's ``server_round``, applied in arrival order:

* ``fedbuff`` (Nguyen et al. 2022): arriving deltas, scaled by ``s(staleness)``, are buffered;
  every ``buffer`` arrivals ``K`` the server averages them, each with weight ``1/K`` as in the
  paper (``weighting = "uniform"``), or with the aggregator's weights (``"aggregator"``:
  training-set sizes by default), and steps;
* ``fedasync`` (Xie et al. 2019): every arrival is a server step mixing the client's model,
  ``x <- x + alpha * s(staleness) * (x_client - x)``, with ``x_client`` = the model it
  started from plus its delta.

Privacy (``plan.privacy``). Record-level modes (``dp_sgd``, ``intrinsic``) and ``local`` protect
each client's data by the noise of each of its own releases, so a run's epsilon is that of the
client that has taken part most often: a participation is charged to the accountant when some
client is dispatched for the ``n``-th time and no client had been dispatched ``n`` times before
(the synchronous driver charges every round, which bounds the same quantity). Before such a
dispatch the budget is checked; if it would be exceeded nobody else is dispatched, the clients in
flight finish, and the run stops cleanly with the reason (``final.json["privacy"]["stopped"]``).
``dp_fedavg`` is refused: its accounting amplifies by Poisson-sampled cohorts, and FedBuff's
buffers are not Poisson samples (a client can even appear in one buffer twice).

Staleness = server versions applied since the client's dispatch; ``s`` is ``constant`` (1),
``polynomial`` ``(1 + tau)^-a`` or ``hinge`` (1 up to ``b``, then ``1 / (a (tau - b) + 1)``).
Updates staler than ``max_staleness`` are dropped and counted (``stale_dropped``). One line of
``metrics.jsonl`` per server step (``round`` = model version), with ``sim_time`` when devices
are simulated. With zero delays, ``concurrency = buffer = C`` and constant staleness weights,
FedBuff equals synchronous FedAvg with ``C`` clients per round, uniformly weighted (or weighted
like the aggregator with ``weighting = "aggregator"``; ``tests/hetero``).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atoll import rng, rundir
from atoll import tree as T
from atoll.client import buffer_names, model_loss, params_of
from atoll.evaluate import FederatedEval
from atoll.runlog import Progress as _Progress
from atoll.runlog import Result
from atoll.runlog import evaluate_and_log as _evaluate_and_log
from atoll.runlog import finish as _finish
from atoll.runlog import open_logs as _open_logs
from atoll.runtime import make_runtime
from atoll.runtime.base import AllClientsFailed, active_steps, failure_reasons
from atoll.runtime.check import decode_update
from atoll.runtime.round import broadcast_bytes, one_by_one, server_step
from atoll.runtime.vmap import VmapRuntime
from atoll.runtime.work import plan_clients

log = logging.getLogger("atoll")
MODES = ("fedasync", "fedbuff")
WEIGHTINGS = ("uniform", "aggregator")
STALENESS = ("constant", "polynomial", "hinge")


@dataclass(frozen=True)
class AsyncPlan:
    mode: str = "fedbuff"
    concurrency: int = 10
    buffer: int = 10            # FedBuff's K (FedAsync steps on every arrival)
    alpha: float = 0.6          # FedAsync's mixing weight
    staleness: str = "polynomial"
    a: float = 0.5
    b: float = 4.0
    max_staleness: int | None = None
    weighting: str = "uniform"  # FedBuff: 1/K per buffered update (the paper) or "aggregator"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"async.mode must be one of {MODES}, got {self.mode!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"async.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.staleness not in STALENESS:
            raise ValueError(f"async.staleness must be one of {STALENESS}, got {self.staleness!r}")
        if self.concurrency < 1 or self.buffer < 1:
            raise ValueError(f"async.concurrency and async.buffer must be >= 1, got "
                             f"{self.concurrency}, {self.buffer}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"async.alpha must be in (0, 1], got {self.alpha}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"async.a and async.b must be >= 0, got {self.a}, {self.b}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"async.max_staleness must be >= 0, got {self.max_staleness}")

    def weight(self, tau: int) -> float:
        if self.staleness == "polynomial":
            return (1.0 + tau) ** -self.a
        if self.staleness == "hinge":
            return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)
        return 1.0


@dataclass
class _Group:
    """Clients dispatched on one model version, trained together."""

    gid: int
    version: int
    params: dict
    down_bytes: bytes
    members: list = field(default_factory=list)
    cstates: list = field(default_factory=list)
    outcomes: dict | None = None
    pending: int = 0


@dataclass
class _Window:
    """What happened since the last server step."""

    dispatched: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    stale_dropped: int = 0
    stragglers_dropped: int = 0
    failures: list = field(default_factory=list)
    buffer: list = field(default_factory=list)  # (cid, delta, aux, n, loss, samples, staleness)


class _Driver:
    def __init__(self, algorithm, client_update, data, plan, runtime):
        self.alg, self.update, self.data, self.plan = algorithm, client_update, data, plan
        self.a: AsyncPlan = plan.asynchronous
        self.runtime, self.devices = runtime, plan.devices
        if self.a.mode == "fedasync" and (algorithm.server_fn or algorithm.server_aux):
            raise ValueError(f"async.mode = \"fedasync\" mixes models and cannot run "
                             f"{algorithm.name}'s server hook; use mode = \"fedbuff\"")
        check_privacy(plan.privacy)
        self.privacy = plan.privacy.driver() if plan.privacy is not None else None
        self.uses: dict[int, int] = {}  # participations per client, and the most charged so far
        self.charged = 0
        if self.a.concurrency > len(data.clients):
            raise ValueError(f"async.concurrency ({self.a.concurrency}) exceeds the number of "
                             f"clients ({len(data.clients)})")
        self.t, self.events, self.seq = 0.0, [], itertools.count()
        self.busy: set[int] = set()
        self.groups: dict[int, _Group] = {}
        self.open: _Group | None = None
        self.n_groups = self.waves = 0
        self.wake: float | None = None
        self.win = _Window()
        self.client_states: dict = {}
        self.failed: dict[int, str] = {}  # clients that failed since the last accepted update

    # -- events ---------------------------------------------------------------------------
    def _push(self, t: float, kind: str, cid: int = -1, gid: int = -1) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, cid, gid))

    def run(self, state):
        """Yield ``(state, window)`` after every server step."""
        self._fill(state)
        while True:
            if not self.events:
                if self.privacy is not None and self.privacy.stopped:
                    return  # the budget stopped dispatching and the last client has arrived
                raise RuntimeError("async: no client can be dispatched any more (all offline for good?)")
            self.t, _, kind, cid, gid = heapq.heappop(self.events)
            stepped = False
            if kind == "upload":
                self._upload(cid, self.groups[gid])
            elif kind == "arrive":
                state, stepped = self._arrive(cid, self.groups[gid], state)
            if stepped:
                yield state, self.win
                self.win = _Window()
            if not self.events or self.events[0][0] > self.t:
                self._fill(state)

    def _fill(self, state) -> None:
        free = self.a.concurrency - len(self.busy)
        if free <= 0 or (self.privacy is not None and self.privacy.stopped):
            return
        self.waves += 1
        n = len(self.data.clients)
        order = torch.randperm(n, generator=rng.generator(
            rng.key(self.plan.seed, self.waves, rng.SERVER, "sample"))).tolist()
        avail = self.devices.availability if self.devices is not None else None
        picked = []
        for c in order:
            if c not in self.busy and (avail is None or avail.online(c, self.t)):
                picked.append(c)
                if len(picked) == free:
                    break
        for c in sorted(picked):
            if not self._may_release(c):
                return
            self._dispatch(c, state)
        if len(picked) < free and avail is not None:  # wake up when the next client comes online
            nxt = min((avail.next_online(c, self.t) for c in range(n) if c not in self.busy),
                      default=math.inf)
            if math.isfinite(nxt) and nxt > self.t and (self.wake is None or self.wake <= self.t
                                                         or nxt < self.wake):
                self.wake = nxt
                self._push(nxt, "wake")

    def _may_release(self, cid: int) -> bool:
        """Charge ``cid``'s next participation if it is the most any client has had; False
        (and the driver stops dispatching) if that would exceed the privacy budget."""
        if self.privacy is None:
            return True
        n = self.uses.get(cid, 0) + 1
        if n > self.charged:
            if self.privacy.before_round(n, "participation of a client"):
                return False
            self.privacy.charge()
            self.charged = n
        self.uses[cid] = n
        return True

    def _dispatch(self, cid: int, state) -> None:
        g = self.open
        if g is None or g.version != state.round or g.outcomes is not None or cid in g.members:
            self.n_groups += 1
            g = self.open = _Group(self.n_groups, state.round, state.params,
                                   broadcast_bytes(self.alg, state, self.plan.seed, self.n_groups))
            self.groups[g.gid] = g
        g.members.append(cid)
        g.cstates.append(self.client_states.get(cid))
        g.pending += 1
        self.busy.add(cid)
        self.win.dispatched += 1
        self.win.bytes_down += len(g.down_bytes)
        ready = self.t
        if self.devices is not None:
            k = active_steps(cid, g.gid, self.plan.seed, self.plan.work, self.data.clients[cid].n)
            ready += self.devices.client_time(cid, k, len(g.down_bytes), 0)
        self._push(ready, "upload", cid, g.gid)

    def _train(self, g: _Group) -> None:
        p = self.plan
        if isinstance(self.runtime, VmapRuntime):
            outs = self.runtime.train(self.alg, self.update, g.down_bytes, g.cstates, g.members,
                                      self.data, p.work, p.seed, g.gid)
            for o in outs:  # the messages may be rows of a buffer the next train call reuses
                if o.message is not None and not isinstance(o.message, bytes):
                    o.message = bytes(o.message)
        else:  # the loop runtime's client path (also used under Ray: clients run on the driver)
            plans = plan_clients(g.members, self.data, g.gid, p.seed, p.work)
            outs = one_by_one(self.alg, self.update, g.down_bytes, plans, g.cstates, self.data,
                              p.work, p.seed, g.gid)
        g.outcomes = {o.cid: o for o in outs}
        if self.open is g:
            self.open = None

    def _upload(self, cid: int, g: _Group) -> None:
        if g.outcomes is None:
            self._train(g)
        o = g.outcomes[cid]
        if o.error is not None:
            self._done(cid, g)
            self._fail(cid, o.error)
            return
        self.win.bytes_up += len(o.message)
        up = 0.0 if self.devices is None else len(o.message) / float(self.devices.up[cid])
        self._push(self.t + up, "arrive", cid, g.gid)

    def _fail(self, cid: int, why: str) -> None:
        """Count a failed client; stop once every client failed with no update accepted since."""
        self.win.failures.append((cid, why))
        self.failed[cid] = why
        if len(self.failed) == len(self.data.clients):
            raise AllClientsFailed(f"async: all {len(self.failed)} clients failed with no update "
                                   "accepted in between, so the model cannot train; "
                                   f"{failure_reasons(sorted(self.failed.items()))}")

    def _done(self, cid: int, g: _Group) -> None:
        self.busy.discard(cid)
        g.pending -= 1
        if g.pending == 0 and g.outcomes is not None:
            del self.groups[g.gid]

    def _arrive(self, cid: int, g: _Group, state):
        o = g.outcomes[cid]
        self._done(cid, g)
        tau = state.round - g.version
        if self.a.max_staleness is not None and tau > self.a.max_staleness:
            self.win.stale_dropped += 1
            return state, False
        if o.straggler and self.plan.work.drop_stragglers:
            self.win.stragglers_dropped += 1
            return state, False
        try:
            delta, aux = decode_update(self.alg, o.message, state.params)
        except ValueError as exc:
            self._fail(cid, str(exc))
            return state, False
        self.failed.clear()
        self.client_states[cid] = o.state
        s = self.a.weight(tau)
        if self.a.mode == "fedasync":  # mix the client's model into the current one
            delta = T.scale(T.sub(T.add(g.params, delta), state.params), self.a.alpha * s)
        elif s != 1.0:
            delta = T.scale(delta, s)
        self.win.buffer.append((cid, delta, aux, self.data.clients[cid].n, o.loss, o.samples, tau))
        size = 1 if self.a.mode == "fedasync" else self.a.buffer
        if len(self.win.buffer) < size:
            return state, False
        return self._server_step(state), True

    def _server_step(self, state):
        buf = self.win.buffer
        weights = None
        if self.a.weighting == "uniform" and self.a.mode == "fedbuff":
            weights = torch.ones(len(buf), dtype=next(iter(state.params.values())).dtype)
        return server_step(self.alg, state, [b[0] for b in buf], [b[1] for b in buf],
                           [b[3] for b in buf], [b[2] for b in buf], self.plan.seed, weights)


def check_privacy(spec) -> None:
    """Refuse privacy modes whose accounting asynchronous training would break."""
    if spec is not None and spec.mode == "dp_fedavg":
        raise ValueError("privacy.mode = \"dp_fedavg\" cannot run asynchronously: its epsilon "
                         "amplifies by Poisson-sampled cohorts, and FedBuff's buffers are not "
                         "Poisson samples (a client can even appear in one buffer twice); use "
                         "mode dp_sgd, local or intrinsic, or synchronous rounds")


def simulate_async(algorithm, model, data, plan, *, run_dir=None, runtime=None, resume=False,
                   overwrite=False, progress=False, config_text=None, plots=True):
    """``simulation.simulate`` for ``plan.asynchronous``: same run folder, one line per server step."""
    if resume:
        raise ValueError("asynchronous runs cannot be resumed (the event queue is not "
                         "checkpointed); start a new run")
    runtime = runtime or make_runtime()
    if isinstance(runtime, VmapRuntime):
        runtime.start()
    run_dir = Path(run_dir) if run_dir is not None else None
    fed_eval = FederatedEval(data.clients) if plan.federated_eval else None
    state, metrics = algorithm.init(params_of(model), buffers=buffer_names(model)), []
    if run_dir is not None:
        rundir.prepare(run_dir, overwrite=overwrite)
        _open_logs(run_dir, 0, config_text)
    driver = _Driver(algorithm, algorithm.client(model_loss(model)), data, plan, runtime)
    cum_up = cum_down = 0
    start = time.perf_counter()
    with _Progress(progress, plan.rounds, 0) as bar:
        for state, w in driver.run(state):
            r = state.round
            cum_up += w.bytes_up
            cum_down += w.bytes_down
            samples = sum(b[5] for b in w.buffer)
            stale = [b[6] for b in w.buffer]
            line = {"round": r,
                    "train_loss": sum(b[4] * b[5] for b in w.buffer) / samples if samples > 0 else None,
                    "clients_sampled": w.dispatched, "clients_succeeded": len(w.buffer),
                    "bytes_up": w.bytes_up, "bytes_down": w.bytes_down, "bytes_up_cum": cum_up,
                    "bytes_down_cum": cum_down, "staleness_mean": sum(stale) / len(stale),
                    "staleness_max": max(stale), "stale_dropped": w.stale_dropped}
            if plan.devices is not None:
                line["sim_time"] = driver.t
            if w.stragglers_dropped:
                line["stragglers_dropped"] = w.stragglers_dropped
            if w.failures:
                line["failures"] = [[c, why] for c, why in w.failures]
            if driver.privacy is not None:
                state, privacy_line = driver.privacy.after_round(state, charge=False)
                line.update(privacy_line, participations_max=driver.charged)
            _evaluate_and_log(line, plan, model, state, data, fed_eval, metrics, run_dir, start)
            bar.update(line)
            if r >= plan.rounds:
                break
    privacy = driver.privacy
    if privacy is not None and privacy.stopped:
        log.warning(privacy.stopped)
    final = _finish(model, state, data, fed_eval, run_dir, plots,
                    {"privacy": privacy.summary()} if privacy is not None else {})
    return Result(state, metrics, final, run_dir)
