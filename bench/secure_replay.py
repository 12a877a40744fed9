"""Record and replay a deployment (bench only): the round time separate client machines would see.

On one machine with two cores, 100 deployed clients are threads that take turns on the cores,
so a round's wall adds up every client's work. Here a real run (``Recorder`` clients: the
deploy ``Client``, its training and crypto untouched) records, per round and stage, the digest
of each request a client received, its answer bytes, the header it sent and its own CPU seconds
(``time.thread_time``, with torch on one thread, from receiving the request to submitting the
answer: training, encoding and masking included; the transfer not). Then ``replay`` runs the
server live, in a process of its own (real gRPC, TLS, its real crypto and model step), against
``Stub`` clients: the deploy ``Client`` with only its compute step replaced, which answer each
request with the recorded bytes after sleeping the recorded CPU seconds. A sleep takes no CPU, so
each stub behaves as a client on its own machine that computes for that long; the transfers stay
real. A request that is not the recorded one (another seed, session, cohort or dropout) stops
the replay, and so does a replayed round whose metrics or final model differ from the recording.

What the replay does not show: the stubs' own transfers (TLS, gRPC framing) still run on this
machine's two cores, beside the server, and loopback has no network latency or bandwidth limit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np

from atoll.deploy.client import Client
from atoll.transport.grpc.client import Connection, TransportError


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def params_digest(params: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode() + params[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def drops(n: int, fraction: float, rounds: int, seed: int = 0) -> dict[int, set]:
    """The clients that vanish in each round: ``int(fraction * n)`` of them, seeded by the round."""
    k = int(fraction * n)
    return {r: set(np.random.default_rng([seed, r]).permutation(n)[:k].tolist()) for r in range(1, rounds + 1)}


def vanish(client, conn, r: int):
    """Close the connection and stay away until round ``r`` is over (asking the server's status
    every 0.1 s on a connection of its own), then reconnect (the run loop does, after ``raise``)."""
    conn.close()
    probe, end = Connection(client.server, **client.creds), time.monotonic() + 1200
    try:
        while probe.status()["round"] < r and time.monotonic() < end:
            time.sleep(0.1)
    finally:
        probe.close()
    raise TransportError("UNAVAILABLE", "vanished (bench dropout)", True)


def quiet(run):
    """A client's run, ended quietly when the server has gone (a vanished client come back late)."""
    def go():
        try:
            run()
        except TransportError:
            pass
    return go


class _Spy:
    """A connection whose ``submit`` is recorded before it is sent."""

    def __init__(self, conn, sink):
        self.conn, self.sink = conn, sink

    def submit(self, r, task_id, data, **head):
        self.sink(data, head)
        return self.conn.submit(r, task_id, data, **head)


class Recorder(Client):
    """A real deployed client that vanishes at stage ``drops[round]`` (0: the training task)
    and records what it received and answered, answers as files in ``out``."""

    def __init__(self, *a, out, drops: dict, **kw):
        super().__init__(*a, **kw)
        self.out, self.drops, self.log, self.inputs = Path(out), drops, {}, {}

    def _answer(self, conn, task):
        self._record(conn, task, 0, lambda spy: Client._answer(self, spy, task))

    def _stage(self, conn, task):
        self._record(conn, task, task.stage, lambda spy: Client._stage(self, spy, task))

    def _record(self, conn, task, stage: int, step) -> None:
        key = f"{task.round}/{stage}"
        if self.drops.get(task.round) == stage:
            self.log[key] = {"request": digest(task.data), "vanished": True}
            vanish(self, conn, task.round)
        t0 = time.thread_time()

        def sink(data, head):
            cpu = time.thread_time() - t0
            name = f"{self.cid}-{key.replace('/', '-')}.bin"
            (self.out / name).write_bytes(data)
            self.log[key] = {"request": digest(task.data), "answer": name, "head": head, "cpu": cpu}

        step(_Spy(conn, sink))
        if stage == 0 and self.secure is not None:
            self.inputs[task.round] = self.secure.x  # the encoded input: the exactness check's


class Stub(Client):
    """The recorded client: each request is checked against the recorded digest and answered
    with the recorded bytes and header after sleeping the recorded CPU seconds."""

    def __init__(self, *a, log: dict, out, failures: list, **kw):
        super().__init__(*a, **kw)
        self.log, self.out, self.failures, self.times = log, Path(out), failures, {}

    def _setup(self, info: dict) -> None:  # nothing to build: the compute step is replayed
        self.cid, self.run_id, self.secure = info["client_id"], "replay", True

    def _answer(self, conn, task):
        self._replay(conn, task, 0)

    def _stage(self, conn, task):
        self._replay(conn, task, task.stage)

    def _replay(self, conn, task, stage: int) -> None:
        rec = self.log.get(f"{task.round}/{stage}")
        if rec is None or rec["request"] != digest(task.data):
            why = (f"client {self.cid}: round {task.round} stage {stage}: "
                   f"{'not requested' if rec is None else 'a request that differs'} in the recording")
            self.failures.append(why)
            raise RuntimeError(why)
        if rec.get("vanished"):
            vanish(self, conn, task.round)
        t0 = time.monotonic()
        data = (self.out / rec["answer"]).read_bytes()
        time.sleep(rec["cpu"])
        conn.submit(task.round, task.task_id, data, **rec["head"])
        self.times[(task.round, stage)] = (t0, time.monotonic())  # request in, answer sent


def record_sessions(sessions: dict):
    """Patch ``Setup.new`` to note (``sessions`` None: nothing) or impose each round's session."""
    from atoll.secure.setup import Setup
    original = Setup.new

    def new(clients, round_, *a, **kw):
        setup = original(clients, round_, *a, **kw)
        if str(round_) in sessions:
            return dataclasses.replace(setup, session=bytes.fromhex(sessions[str(round_)]))
        sessions[str(round_)] = setup.session.hex()
        return setup

    Setup.new = staticmethod(new)
    return lambda: setattr(Setup, "new", staticmethod(original))


def _serve(tmp: str, sessions: dict, ports) -> None:
    """The replay's server, in its own process: the recorded sessions imposed."""
    import logging

    from atoll import config
    from atoll.deploy.server import Server
    import torch
    logging.getLogger("atoll.deploy").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # as the recorded server ran
    record_sessions(dict(sessions))
    tmp = Path(tmp)
    server = Server(config.load(tmp / "replay.toml"), run_dir=tmp / "replay-run", certs_dir=tmp / "certs",
                    host="127.0.0.1", port=0, auth="token", plots=False, linger_s=0.5)
    ports.put(server.port)
    server.run()
    (tmp / "replay-run" / "params.sha256").write_text(params_digest(server.coordinator.state.params))


def replay(tmp: Path, text: str, enrolled: list, logs: dict, sessions: dict) -> tuple[list, list]:
    """Replay the run recorded in ``tmp`` (config ``text``): the replayed round walls, and in each
    the seconds spent waiting for vanished clients (``idle``)."""
    (tmp / "replay.toml").write_text(text)
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(str(tmp), sessions, ports), daemon=True)
    proc.start()
    port = ports.get(timeout=300)
    failures: list[str] = []
    stubs = [Stub(f"127.0.0.1:{port}", None, ca=e["ca"], token=e["token"], backoff=(0.01, 1.0),
                  give_up_s=60, log=logs[i], out=tmp / "answers", failures=failures)
             for i, e in enumerate(enrolled)]
    threads = [threading.Thread(target=quiet(s.run), daemon=True) for s in stubs]
    for t in threads:
        t.start()
    end = time.monotonic() + 1200
    while proc.is_alive() and not failures and time.monotonic() < end:
        proc.join(1.0)
    if proc.is_alive():
        proc.kill()
    end = time.monotonic() + 5  # a stub still away (vanished) is not waited for
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    if failures:
        done = tmp / "replay-run" / "metrics.jsonl"
        seen = [{k: v for k, v in json.loads(ln).items() if k in SAME + ("failures",)}
                for ln in (done.read_text().splitlines() if done.exists() else [])]
        raise SystemExit(f"replay of {tmp}: the server's requests are not the recorded ones:\n"
                         + "\n".join(sorted(set(failures))[:5]) + f"\nreplayed rounds: {seen}")
    check_same(tmp)
    read = lambda f: [json.loads(ln) for ln in (tmp / "replay-run" / f).read_text().splitlines()]  # noqa: E731
    timings = read("timings.jsonl")
    walls = [b["wall_s"] - a["wall_s"] for a, b in zip([{"wall_s": 0.0}] + timings, timings)]
    return walls, [idle(line, stubs) for line in read("metrics.jsonl")]


def idle(line: dict, stubs: list) -> float:
    """Seconds of round ``line`` that its secure stages stayed open after the last survivor's
    answer was sent: the wait for the vanished clients (``secure.stage_timeout``)."""
    out = 0.0
    for k, wall in enumerate(line.get("secure_stage_s", []), 1):
        times = [s.times[(line["round"], k)] for s in stubs if (line["round"], k) in s.times]
        if times:
            out += max(0.0, wall - (max(t[1] for t in times) - min(t[0] for t in times)))
    return out


SAME = ("round", "clients_succeeded", "secure_survivors", "secure_stage_survivors", "train_loss",
        "test_acc", "secure_client_s")


def check_same(tmp: Path) -> None:
    """The replayed rounds are the recorded ones: their metrics and the final model."""
    lines = lambda d: [json.loads(ln) for ln in (tmp / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    got, want = lines("replay-run"), lines("run")
    diff = [(w["round"], k, w.get(k), g.get(k)) for g, w in zip(got, want) for k in SAME if g.get(k) != w.get(k)]
    same_model = (tmp / "replay-run" / "params.sha256").read_text() == (tmp / "run" / "params.sha256").read_text()
    if len(got) != len(want) or diff or not same_model:
        raise SystemExit(f"replay: the replayed rounds differ from the recording: {len(got)} rounds "
                         f"of {len(want)}, metrics (round, key, recorded, replayed) {diff[:5]}, "
                         f"same final model: {same_model}")
