"""The event-driven driver of asynchronous training (see ``atoll.asynchronous``): waves of
dispatches, groups trained together, uploads and arrivals on the simulated clock, the server
step of FedAsync (every arrival) or FedBuff (every ``buffer`` arrivals)."""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

import torch

from atoll import rng
from atoll import tree as T
from atoll.asynchronous.plan import AsyncPlan, check_privacy
from atoll.runtime.base import AllClientsFailed, active_steps, failure_reasons
from atoll.runtime.check import decode_update
from atoll.runtime.round import broadcast_bytes, one_by_one, server_step
from atoll.runtime.vmap import VmapRuntime
from atoll.runtime.work import plan_clients


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


class Driver:
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
