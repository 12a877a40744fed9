"""The server's half of deployment, without any transport: rounds, validation, run folder.

``Coordinator.run()`` does what ``simulate`` does, round after round, except that the clients are
real: it samples a cohort (``atoll.sampling``, same keys as simulation), publishes the downlink
bytes, hands each sampled client its task when that client asks for it (clients pull), validates
every update as it arrives, and closes the round when

* every sampled client has answered (accepted, rejected or dropped as a straggler), or
* ``ceil(min_fraction * cohort)`` valid updates have arrived (at least ``min_clients``), or
* ``round_timeout`` seconds have passed since the first sampled client took its task (the clock
  starts then, so a server waiting for clients to reconnect does not burn rounds).

A round that closes with fewer than ``min(min_clients, cohort)`` valid updates leaves the model
unchanged (the round is still counted, like a simulated round where every client failed).
Answers for a closed round are discarded and counted (``late_answers`` in the metrics line of
the round during which they arrived). Updates are aggregated in cohort order, exactly as
``LoopRuntime`` does, so a deployment reproduces the simulation of the same config and seed.

With ``[secure]`` the training answers carry headers only, and the round's sum comes from the
four SecAgg stages run with the clients that answered (``deploy.secure_rounds``), or from their
ciphertexts summed and opened by the decryptors (homomorphic encryption, ``deploy.he_rounds``).

After every round the state is written atomically (``checkpoint.pt``) after the metrics line; a
restarted coordinator resumes from the last completed round and trims any later line.

No client can crash, freeze or poison it (docs/deployment.md, "What the server validates"):
headers, bytes and norms are checked (``deploy.guard``, ``runtime.check.decode_update``); a
server step that raises or leaves a non-finite number in the state is discarded: the round
keeps the model as it was, its metrics line says why (``server_error``), the checkpoint never
holds it.
"""
from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from pathlib import Path

from atoll import checkpoint, rundir, sampling
from atoll.client import buffer_names, params_of
from atoll.evaluate import centralized
from atoll.deploy import downlink, fingerprint, guard
from atoll.deploy.intake import Intake
from atoll.deploy.rounds import (Answer, Header, Round, RoundPolicy, check_same_config,  # noqa: F401
                                 same_run)
from atoll.deploy.he_rounds import secure_rounds
from atoll.runtime.round import broadcast_bytes, server_step
from atoll.runtime.secure_round import layout, step_on_buckets
from atoll.runlog import append as _append
from atoll.runlog import finish as _finish
from atoll.runlog import json_safe, round_line
from atoll.runlog import open_logs as _open_logs
from atoll.runlog import record_copies
from atoll.transport import wire

log = logging.getLogger("atoll.deploy")


def downlink_bytes(algorithm, state, seed: int) -> bytes:
    """The broadcast of round ``state.round + 1`` as wire bytes (``runtime.round``'s)."""
    return broadcast_bytes(algorithm, state, seed, state.round + 1)


class Coordinator(Intake):
    def __init__(self, algorithm, model, data, plan, *, run_dir, policy: RoundPolicy = RoundPolicy(),
                 config_text: str | None = None, plots: bool = True, enrolled=None,
                 overwrite: bool = False, he=None):
        self.enrolled = enrolled  # () -> ids that may be sampled (None: all); revoked ids are not
        self.algorithm, self.model, self.data, self.plan = algorithm, model, data, plan
        self.policy, self.plots = policy, plots
        self.num_clients = len(data.clients)
        self.run_dir = Path(run_dir)
        if overwrite or not same_run(self.run_dir, config_text):  # a restart of this run resumes it
            rundir.prepare(self.run_dir, overwrite=overwrite)
        self.state = algorithm.init(params_of(model), buffers=buffer_names(model))
        if algorithm.tracker is not None:  # the models clients may hold, by round (w_0 always)
            downlink.check_supported(algorithm)
            self.hashes = {0: downlink.model_hash(self.state.params)}
        if (self.run_dir / checkpoint.FILE).exists():
            check_same_config(self.run_dir, config_text)
            self.state, _ = checkpoint.load(self.run_dir)
            log.warning("resuming %s after round %d", self.run_dir, self.state.round)
        self.metrics = _open_logs(self.run_dir, self.state.round, config_text)
        record_copies(algorithm, self.run_dir)  # fingerprints.json: each client's code
        # [privacy]: the simulation's accountant, kept in state.extra (so in every checkpoint)
        self.privacy = plan.privacy.driver(self.state) if plan.privacy is not None else None
        self.max_update_bytes = 2 * len(wire.dumps(self.state.params)) + 65536
        self.cond = threading.Condition()
        self.secure = secure_rounds(algorithm, policy, self.cond, he)  # [secure]: after training
        self.current: Round | None = None
        self.phase = "starting"
        self.late = 0
        self.last_seen: dict[int, float] = {}
        self.final: dict | None = None
        self._stop = False

    # ---- called by the transport, one thread per RPC --------------------------------------
    def seen(self, cid: int) -> None:
        self.last_seen[cid] = time.monotonic()

    def next_task(self, cid: int, wait_s: float, held: tuple[int, str] | None = None):
        """``("TASK", round, task_id, bytes)``, ``("SYNC", round, "", bytes)`` (an anchor for a
        client not sampled), ``("WAIT",)`` or ``("DONE",)``; long-polls. ``held``: the round and
        ``downlink.model_hash`` of the model the client holds (with a tracker)."""
        until = time.monotonic() + min(max(wait_s, 0.0), self.policy.poll_s)
        with self.cond:
            while True:
                self.seen(cid)
                if self.phase in ("finishing", "done"):
                    return ("DONE",)
                rnd = self.current
                stage = self.secure.task(rnd, cid) if rnd and self.secure else None
                if stage is not None:
                    self.cond.notify_all()
                    return stage
                if (rnd and not rnd.closed and cid in rnd.tasks and cid not in rnd.final
                        and cid not in rnd.busy):
                    rnd.opened = rnd.opened or time.monotonic()
                    log.debug("round %d: task sent to client %d", rnd.r, cid)
                    data = rnd.down if rnd.tracked is None else rnd.tracked.task(cid, self._held(held))
                    rnd.stats.bytes_down += len(data)
                    self.cond.notify_all()
                    return ("TASK", rnd.r, rnd.tasks[cid], data)
                t = rnd.tracked if rnd and not rnd.closed else None
                if t is not None and t.anchor is not None and cid not in t.anchored:
                    data = t.sync(cid, self._held(held))
                    self.cond.notify_all()
                    if data is not None:
                        rnd.stats.bytes_down += len(data)
                        return ("SYNC", rnd.r, "", data)
                left = until - time.monotonic()
                if left <= 0:
                    return ("WAIT",)
                self.cond.wait(left)

    def _held(self, held) -> int | None:
        """The round of the model a client says it holds, if its hash is that round's model's."""
        if held is None or self.algorithm.tracker is None:
            return None
        want = self.hashes.get(held[0])
        return held[0] if want is not None and secrets.compare_digest(want, held[1]) else None

    def status(self) -> dict:
        with self.cond:
            rnd, now = self.current, time.monotonic()
            return {"phase": self.phase, "round": self.state.round, "rounds": self.plan.rounds,
                    "clients_connected": sum(now - t < self.policy.poll_s + 5
                                             for t in self.last_seen.values()),
                    "sampled": len(rnd.cohort) if rnd and not rnd.closed else 0,
                    "answered": len(rnd.answers) if rnd and not rnd.closed else 0,
                    "last_metrics": self.metrics[-1] if self.metrics else {}}

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()

    # ---- the round loop --------------------------------------------------------------------
    def run(self) -> dict | None:
        """Run the remaining rounds; returns the final evaluation (None if stopped early)."""
        start = time.perf_counter()
        while self.state.round < self.plan.rounds:
            if self.privacy is not None and self.privacy.before_round(self.state.round + 1):
                log.warning("%s", self.privacy.stopped)
                break  # the budget would be exceeded: final evaluation below
            rnd = self._open()
            self._wait(rnd)
            if self._stop:
                return None
            self._close(rnd, start)
        with self.cond:  # clients may go: the final evaluation and plots need only the server
            self.phase = "finishing"
            self.cond.notify_all()
        extra = {"privacy": self.privacy.summary()} if self.privacy is not None else None
        final = _finish(self.model, self.state, self.data, None, self.run_dir, self.plots, extra)
        with self.cond:
            self.final, self.phase = final, "done"
            self.cond.notify_all()
        return final

    def _open(self) -> Round:
        p, r = self.plan, self.state.round + 1
        cohort = sampling.sample(self.num_clients, r, p.seed, method=p.sampling,
                                 count=p.clients_per_round, fraction=p.fraction, rate=p.rate)
        if self.enrolled is not None:  # same draw as simulation, minus revoked clients
            ids = self._some_enrolled()
            cohort = [c for c in cohort if c in ids]
        tracked, state = None, self.state
        if self.algorithm.tracker is not None:  # per-client payloads, the tracker's state advanced
            self.hashes[state.round] = downlink.model_hash(state.params)
            tracked, state = downlink.open_round(self.algorithm, state, cohort)
        elif self.algorithm.client_copy is not None:  # [watermark] fingerprint: each its own copy
            tracked = fingerprint.open_round(self.algorithm, state, cohort, p.seed)
        rnd = Round(r, cohort, b"" if tracked else downlink_bytes(self.algorithm, state, p.seed),
                     {c: secrets.token_hex(16) for c in cohort}, state.params, tracked=tracked)
        rnd.stats.sampled = len(cohort)
        with self.cond:
            self.state, self.current, self.phase = state, rnd, "training"
            self.cond.notify_all()
        return rnd

    def _some_enrolled(self) -> set[int]:
        """The enrolled ids, once there is at least one (rounds do not run with nobody enrolled)."""
        with self.cond:
            while not (ids := self.enrolled()) and not self._stop:
                self.cond.wait(1.0)
            return ids

    def _wait(self, rnd: Round) -> None:
        target = max(self.policy.min_clients, math.ceil(self.policy.min_fraction * len(rnd.cohort)))
        with self.cond:
            while not self._stop:
                if ((len(rnd.final & set(rnd.cohort)) == len(rnd.cohort) or len(rnd.answers) >= target)
                        and not self._anchor_pending(rnd)):
                    break
                left = None if rnd.opened is None else rnd.opened + self.policy.round_timeout - time.monotonic()
                if left is not None and left <= 0:
                    log.warning("round %d: deadline passed with %d of %d updates", rnd.r,
                                len(rnd.answers), len(rnd.cohort))
                    break
                self.cond.wait(left if left is not None else 1.0)
            rnd.closed = True
            self.phase = "aggregating"
            rnd.late, self.late = self.late, 0

    def _anchor_pending(self, rnd: Round) -> bool:
        """Whether a connected client has not been offered this round's anchor yet."""
        if rnd.tracked is None or rnd.tracked.anchor is None:
            return False
        now = time.monotonic()
        connected = {c for c, t in self.last_seen.items() if now - t < self.policy.poll_s + 5}
        return bool(connected - rnd.tracked.anchored)

    def _close(self, rnd: Round, start: float) -> None:
        ids = [c for c in rnd.cohort if c in rnd.answers]
        outliers = [] if self.secure else guard.outliers({c: rnd.answers[c] for c in ids},
                                                         self.policy.max_norm_ratio)
        for c, why in outliers:
            ids.remove(c)
            rnd.stats.failures.append((c, why))
            log.warning("round %d: update from client %d dropped: %s", rnd.r, c, why)
        if len(ids) < min(self.policy.min_clients, len(rnd.cohort)):
            log.warning("round %d: %d valid updates < min_clients; model unchanged", rnd.r, len(ids))
            ids = []
        got = [rnd.answers[c] for c in ids]
        try:
            state = self._step(rnd, ids, got)
            bad = guard.not_finite(state)
            if bad:
                raise ValueError(f"the server step left {bad} not finite")
        except Exception as exc:  # contained: the round keeps the model, the checkpoint never sees it
            rnd.server_error = f"{type(exc).__name__}: {exc}"
            log.error("round %d: server step failed, model unchanged: %s", rnd.r, rnd.server_error)
            ids, got = [], []
            state = server_step(self.algorithm, self.state, [], [], [], [], self.plan.seed)
        if self._stop:
            return
        if self.privacy is not None:
            state, rnd.privacy = self.privacy.after_round(state)
        s = rnd.stats
        s.succeeded = len(ids)
        for g in got:
            s.loss_sum += g.loss * g.samples
            s.samples += g.samples
        self._write(rnd, state, start)

    def _step(self, rnd: Round, ids: list[int], got: list[Answer]):
        """The server step: on the valid updates, or on their secure sum (``deploy.secure_rounds``)."""
        if self.secure is None or not ids:
            return server_step(self.algorithm, self.state, ids, [g.delta for g in got],
                               [g.num_examples for g in got], [g.aux for g in got], self.plan.seed)
        # one secure sum per bucket, the buckets' protocols one after the other
        lay = layout(self.algorithm, self.state.params, self.plan.seed, rnd.r)  # the clients' too

        def sum_bucket(group):
            mean, extra = self.secure.run(rnd, group, lay.like, lambda: self._stop)
            if mean is None:  # failed securely, its reason in failures; its stage stats kept
                rnd.stats.extra.update(extra)
                return None
            return mean, extra

        return step_on_buckets(self.algorithm, self.state, ids, lay, self.plan.seed, sum_bucket,
                               rnd.stats.extra)

    def _write(self, rnd: Round, state, start: float) -> None:
        s, r, p = rnd.stats, rnd.r, self.plan
        line = round_line(r, s, self.metrics, **rnd.privacy, **s.extra)
        if rnd.late:
            line["late_answers"] = rnd.late
        if rnd.server_error:
            line["server_error"] = rnd.server_error
        if r % p.eval_every == 0 or r == p.rounds:
            line.update(centralized(self.model, state.params, self.data.x_test, self.data.y_test))
        line = json_safe(line)  # the line status() serves too: no NaN anywhere
        _append(self.run_dir / "metrics.jsonl", line)
        _append(self.run_dir / "timings.jsonl", {"round": r, "wall_s": round(time.perf_counter() - start, 4)})
        checkpoint.save(self.run_dir, state, {})
        with self.cond:
            self.metrics.append(line)
            self.state = state

