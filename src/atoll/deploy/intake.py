"""The coordinator's intake of training answers (``Coordinator.submit``): each update is
checked as it arrives (round, task id, header, size, decoding, norm) and kept or refused with its
reason; a secure-aggregation stage answer goes to ``deploy.secure_rounds``. Under ``[secure]``
a training answer is its header alone: the update stays on the client until the secure sum."""
from __future__ import annotations

import logging
import secrets

from atoll.deploy import guard
from atoll.deploy.rounds import Answer, Header, Round, read_chunks
from atoll.runtime.check import decode_update

log = logging.getLogger("atoll.deploy")


class Intake:
    """Mixed into ``Coordinator`` (its lock ``cond``, ``current`` round, policy and algorithm)."""

    def submit(self, cid: int, head: Header, chunks) -> tuple[bool, str]:
        """Validate and keep one update; ``chunks`` iterates over its bytes. (accepted, reason)."""
        with self.cond:
            self.seen(cid)
            rnd = self.current
        if head.stage:
            return (self.secure.submit(rnd, cid, head, chunks) if self.secure is not None
                    else (False, "this run has no secure aggregation stages"))
        with self.cond:
            rnd = self.current
            if rnd is None or head.round < rnd.r or (head.round == rnd.r and rnd.closed):
                self.late += 1
                return False, f"late: round {head.round} is closed"
            why = self._refuse(rnd, cid, head)
            if why:
                rnd.stats.failures.append((cid, why))
                log.warning("round %d: update from client %d rejected: %s", rnd.r, cid, why)
                return False, why
            rnd.busy.add(cid)
        try:
            # under a secure sum a training answer is its header alone: the update stays on the client
            data, why = read_chunks(chunks, 0 if self.secure else self.max_update_bytes)
            delta = aux = None
            if why is None and not (head.straggler and self.plan.work.drop_stragglers):
                delta, aux, why = self._decode(data, rnd)
        finally:
            with self.cond:
                rnd.busy.discard(cid)
        return self._record(rnd, cid, head, data, delta, aux, why)

    def _decode(self, data: bytes, rnd: Round):
        if self.secure is not None:
            return {}, {}, None
        try:
            delta, aux = decode_update(self.algorithm, data, rnd.params)
            return delta, aux, self._too_large(delta)
        except ValueError as exc:
            return None, None, str(exc)

    def _too_large(self, delta) -> str | None:
        bound, norm = self.policy.max_update_norm, guard.l2(delta)
        if bound is not None and not norm <= bound:
            return f"update L2 norm {norm:.4g} exceeds deploy.max_update_norm = {bound:g}"
        return None

    def _refuse(self, rnd: Round, cid: int, head: Header) -> str | None:
        if head.round > rnd.r:
            return f"round {head.round} is not open (the current round is {rnd.r})"
        if cid not in rnd.tasks:
            return f"client {cid} was not sampled in round {rnd.r}"
        if cid in rnd.final or cid in rnd.busy:
            return f"client {cid} already answered round {rnd.r} (replayed update)"
        if not secrets.compare_digest(head.task_id, rnd.tasks[cid]):
            return f"task id does not match round {rnd.r}'s task for client {cid} (replayed update)"
        bad = guard.bad_header(head, self.policy.max_num_examples)
        if bad:  # the client's answer, a bad one
            rnd.final.add(cid)
            self.cond.notify_all()
        return bad

    def _record(self, rnd, cid, head, data, delta, aux, why) -> tuple[bool, str]:
        with self.cond:
            if rnd.closed:
                self.late += 1
                return False, f"late: round {rnd.r} closed while the update arrived"
            rnd.stats.bytes_up += len(data)
            rnd.final.add(cid)
            self.cond.notify_all()
            if why is not None:
                rnd.stats.failures.append((cid, why))
                log.warning("round %d: update from client %d rejected: %s", rnd.r, cid, why)
                return False, why
            if delta is None:
                rnd.stats.stragglers_dropped += 1
                return False, "straggler dropped (client.drop_stragglers)"
            rnd.answers[cid] = Answer(delta, aux, head.num_examples, head.loss, head.samples,
                                      guard.l2(delta), guard.l2(aux))
            log.debug("round %d: update from client %d accepted", rnd.r, cid)
            return True, ""

