"""Secure aggregation in deployment: the server's side of the four SecAgg stages, run with the
real clients as round trips over the coordinator's task / answer calls (docs/secure-aggregation.md).

After the training phase the clients that answered (their header only: the update stays on the
client, encoded for the secure sum) are the cohort of ``secagg.Setup``. Each stage publishes
one request per live client (``STAGE`` tasks, ``atoll.secure.stagewire`` bytes) and waits for
the answers until every one is in, or ``secure.stage_timeout`` seconds have passed, or (with
``secure.stage_quorum < 1``) as long again as it took that share of them to answer; a client that
does not answer, refuses (empty answer) or sends a malformed answer is dropped at that stage
with its reason in ``failures``, and the protocol goes on with the others. The server's steps
are ``secagg.Server``'s, exactly those of the simulation (``secagg.run``); the pairwise-sealed
share ciphertexts are relayed, never opened. Fewer than ``threshold`` answers at any stage, or a
seed that cannot be rebuilt, ends the round with ``SecAggError``: the coordinator keeps the model.
With ``[secure] malicious`` (``atoll.secure.active``) the advertisements are signed and carry the
signer's certificate (forwarded only when they verify against the CA), and stage 4 is the
consistency check: five stages.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass, field


from atoll.deploy.rounds import read_chunks
from atoll.secure import active as A
from atoll.secure import secagg
from atoll.secure import stagewire as W

log = logging.getLogger("atoll.deploy")


@dataclass
class Stage:
    k: int
    requests: dict          # cid -> request bytes
    limits: dict            # cid -> largest answer accepted
    parse: object           # (cid, raw) -> the answer for secagg.Server; ValueError if malformed
    opened: float = field(default_factory=time.monotonic)
    answers: dict = field(default_factory=dict)   # cid -> parsed answer
    done: set = field(default_factory=set)        # cids whose answer is in (any outcome)
    busy: set = field(default_factory=set)
    up: dict = field(default_factory=dict)        # cid -> answer bytes
    seconds: dict = field(default_factory=dict)   # cid -> the client's crypto seconds


class SecureRounds:
    """The stage driver of one coordinator (``cond``: the coordinator's condition)."""

    def __init__(self, secure, stage_timeout: float, cond, pki=None, quorum: float = 1.0):
        self.secure, self.timeout, self.cond = secure, stage_timeout, cond
        self.quorum = quorum  # secure.stage_quorum: a stage closes early once this share answered
        self.pki = pki  # [secure] malicious: the deployment's CA (secure.active.CertificatePKI)

    # ---- called by the transport threads, under the coordinator's lock ------------------------
    def task(self, rnd, cid: int):
        st = rnd.secure
        if st is None or cid not in st.requests or cid in st.done or cid in st.busy:
            return None
        data = st.requests[cid]
        rnd.stats.bytes_down += len(data)
        return ("STAGE", rnd.r, rnd.tasks[cid], data, st.k)

    def submit(self, rnd, cid: int, head, chunks) -> tuple[bool, str]:
        with self.cond:
            st = rnd.secure if rnd is not None and rnd.r == head.round else None
            if st is None or st.k != head.stage:
                return False, f"late: stage {head.stage} of round {head.round} is not open"
            if cid not in st.requests or cid in st.done or cid in st.busy:
                return False, f"client {cid} has no open request at stage {st.k} (or answered it)"
            if not secrets.compare_digest(head.task_id, rnd.tasks[cid]):
                return False, f"task id does not match round {rnd.r}'s task for client {cid}"
            st.busy.add(cid)
        try:
            data, why = read_chunks(chunks, st.limits[cid])
            if why is None and not data:
                why = "empty answer (the client refused the request)"
            answer = None
            if why is None:
                try:
                    answer = st.parse(cid, data)
                except ValueError as exc:
                    why = str(exc)
        finally:
            with self.cond:
                st.busy.discard(cid)
        return self._record(rnd, st, cid, len(data), answer, head.seconds, why)

    def _record(self, rnd, st: Stage, cid, size, answer, seconds, why) -> tuple[bool, str]:
        with self.cond:
            if rnd.secure is not st:
                return False, f"late: stage {st.k} of round {rnd.r} closed while the answer arrived"
            st.done.add(cid)
            st.up[cid] = size
            rnd.stats.bytes_up += size
            self.cond.notify_all()
            if why is not None:
                why = f"secure stage {st.k}: {why}"
                rnd.stats.failures.append((cid, why))
                log.warning("round %d: client %d dropped: %s", rnd.r, cid, why)
                return False, why
            st.answers[cid] = answer
            st.seconds[cid] = seconds if math.isfinite(seconds) and seconds >= 0 else 0.0
            return True, ""

    # ---- the coordinator's thread ------------------------------------------------------------
    def run(self, rnd, ids: list[int], like: dict, stop) -> tuple[dict | None, dict]:
        """The four stages with clients ``ids``: ``(weighted mean delta, metrics)``; the mean is
        None where the round cannot finish securely (the reason in ``failures``, logged)."""
        stats = _Stats()
        try:
            return self._protocol(rnd, ids, like, stop, stats)
        except (secagg.SecAggError, ValueError) as exc:  # ValueError: shares that do not combine
            why = f"secure aggregation failed: {exc}"
            rnd.stats.failures.append((-1, why))
            log.warning("round %d: %s; model unchanged", rnd.r, why)
            return None, stats.line(None, 0)

    def _protocol(self, rnd, ids, like, stop, stats) -> tuple[dict, dict]:
        d = self.secure.length(sum(v.numel() for v in like.values()))
        setup = self.secure.setup(ids, rnd.r, d)
        mal = self.secure.malicious
        server = A.ActiveServer(setup, pki=self.pki) if mal else secagg.Server(setup)
        adv, size = (W.advert_bytes, W.ADVERT) if mal else (W.keys_bytes, W.KEYS)
        head = W.setup_bytes(setup)
        got = self._stage(rnd, stats, 1, {u: head for u in ids}, {u: size for u in ids},
                          lambda u, raw: W.read_advert(raw) if mal else W.read_keys(raw),
                          setup.threshold, stop)
        keys = stats.timed(server.collect_keys, got)
        got = self._stage(rnd, stats, 2, {u: W.records({v: adv(k) for v, k in m.items()})
                                          for u, m in keys.items()},
                          {u: len(m) * (4 + W.CT) for u, m in keys.items()},
                          lambda u, raw: W.read_records(raw, W.CT, keys[u], "sealed shares"),
                          setup.threshold, stop)
        inbox = stats.timed(server.collect_shares, got)
        got = self._stage(rnd, stats, 3, {u: W.records(m) for u, m in inbox.items()},
                          {u: W.masked_size(setup) for u in inbox}, lambda u, raw: _masked(raw, setup),
                          setup.threshold, stop)
        asks = stats.timed(server.collect_inputs, got)
        if mal:  # the consistency check: every survivor signs the set U3 of survivors
            view = W.records({v: b"" for v in server.view()})
            got = self._stage(rnd, stats, 4, {u: view for u in asks}, {u: A.SIG for u in asks},
                              lambda u, raw: W.read_signature(raw), setup.threshold, stop)
            asks = stats.timed(server.collect_views, got, asks)
        wanted = {u: {v: "b" for v in ask[0] - {u}} | {v: "s" for v in ask[1]} for u, ask in asks.items()}
        got = self._stage(rnd, stats, 5 if mal else 4,
                          {u: (W.unmask_bytes if mal else W.request_bytes)(*asks[u]) for u in asks},
                          {u: W.answer_limit(4, setup, len(wanted[u])) for u in asks},
                          lambda u, raw: W.read_shares(raw, wanted[u]), setup.threshold, stop)
        total = stats.timed(server.finish, got)
        mean = self.secure.mean(total, setup, like, len(server.inputs))
        return mean, stats.line(setup, len(server.inputs))

    def _stage(self, rnd, stats, k: int, requests: dict, limits: dict, parse, threshold: int,
               stop) -> dict:
        """Publish stage ``k``'s requests, wait for the answers (or the stage's deadline); fewer
        than ``threshold`` answers end the round (``SecAggError``)."""
        st = Stage(k, requests, limits, parse)
        with self.cond:
            rnd.secure = st
            self.cond.notify_all()
            end, need, quorate = st.opened + self.timeout, math.ceil(self.quorum * len(requests)), False
            while not stop() and set(requests) - st.done and time.monotonic() < end:
                if not quorate and len(st.done) >= need:  # the rest get as long again as it took
                    now, quorate = time.monotonic(), True
                    end = min(end, now + (now - st.opened))
                self.cond.wait(max(0.0, min(end - time.monotonic(), 1.0)))
            rnd.secure = None
            if stop():
                raise secagg.SecAggError("the server is stopping")
            late = sorted(set(requests) - st.done)
            took = time.monotonic() - st.opened
            why = (f"no answer {took:.3g} s after the stage opened, as long again as "
                   "secure.stage_quorum of its clients took" if quorate and took < self.timeout
                   else f"no answer within secure.stage_timeout = {self.timeout:g} s")
            for cid in late:
                rnd.stats.failures.append((cid, f"secure stage {k}: {why}"))
            stats.add(st, time.monotonic() - st.opened)
        if late:
            log.warning("round %d: secure stage %d: no answer from clients %s", rnd.r, k, late)
        if len(st.answers) < threshold:
            raise secagg.SecAggError(f"stage {k}: {len(st.answers)} clients answered, fewer than "
                                     f"the threshold {threshold}")
        return dict(st.answers)


def _masked(raw: bytes, setup) -> bytes:
    if len(raw) != W.masked_size(setup):
        raise ValueError(f"masked vector: {len(raw)} bytes, {W.masked_size(setup)} expected")
    return raw


class _Stats:
    """Per stage: survivors, largest request and answer of one client, wall seconds; the
    server's crypto seconds and the slowest client's."""

    def __init__(self):
        self.survivors, self.down, self.up, self.wall = [], [], [], []
        self.server_s, self.client_s = 0.0, {}

    def add(self, st: Stage, wall: float) -> None:
        self.survivors.append(len(st.answers))
        self.down.append(max(map(len, st.requests.values()), default=0))
        self.up.append(max(st.up.values(), default=0))
        self.wall.append(round(wall, 4))
        for cid, s in st.seconds.items():
            self.client_s[cid] = self.client_s.get(cid, 0.0) + s

    def timed(self, step, *args):  # the server thread's CPU seconds, as the clients'
        t0 = time.thread_time()
        try:
            return step(*args)
        finally:
            self.server_s += time.thread_time() - t0

    def line(self, setup, survivors: int) -> dict:
        sizes = {} if setup is None else {"secure_bits": setup.bits,
                                          "secure_bytes_up": W.masked_size(setup)}
        return {"secure_survivors": survivors, **sizes, "secure_stage_survivors": self.survivors,
                "secure_stage_bytes_up": self.up, "secure_stage_bytes_down": self.down,
                "secure_stage_s": self.wall, "secure_server_s": round(self.server_s, 4),
                "secure_client_s": round(max(self.client_s.values(), default=0.0), 4)}
