"""Secure aggregation in deployment: a server and n deployed clients (threads of this process)
over loopback gRPC with TLS and tokens, ``[secure]`` on; prints per stage the wall seconds,
the survivors and the largest request / answer of one client, then the crypto seconds.

    PYTHONPATH=src python bench/secure_deploy.py [--clients 8] [--rounds 3] [--method secagg+]
                                                 [--neighbours 4] [--hidden 64] [--malicious]
                                                 [--dropout 0.1 [--drop-stage 3]]
                                                 [--replay [--replay-stage-timeout 10]]

Figures are medians over the rounds. All parties share this machine's cores and Python's GIL,
so the wall seconds are an upper bound on what separate machines would see. The same deployment
without ``[secure]`` runs after it, in the same process, and the ratio of the median round walls
is printed (the issue's target: at most 1.3x). With ``--malicious`` the secure run has
``[secure] malicious = true`` (certificate-enrolled clients, signed keys, the consistency check)
and the run it is compared to is the same deployment in the semi-honest protocol.

``--dropout f``: in every round ``int(f * n)`` clients (drawn from the round) vanish: they close
their connection and stay away until the stage is over, at secure stage ``--drop-stage`` (1 keys,
2 shares, 3 masked input (default: after sharing, so the server rebuilds their pair masks),
4 unmask); in the run without ``[secure]`` the same clients vanish with the training task, and
that run closes its rounds once the others are in (``deploy.min_fraction = 1 - f``). The bench
checks that every round's secure sum is exactly the ring sum of the survivors' encoded inputs.

``--replay`` (bench/secure_replay.py): both runs are recorded and then replayed with the server
in its own process against stub clients that sleep each client's recorded CPU seconds, as clients
on separate machines would compute in parallel; prints the replayed round walls and their ratio.
"""
import argparse
import json
import logging
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from atoll import config
from atoll.deploy import local
from atoll.deploy.server import Server
from atoll.secure import secagg
from secure_replay import Recorder, drops, params_digest, quiet, record_sessions, replay

TOML = """
name = "secure-bench"
rounds = {rounds}
[data]
name = "digits"
num_clients = {clients}
[model]
hidden = [{hidden}]
[client]
batch_size = 32
[deploy]
round_timeout = 120
{min_fraction}[secure]
method = "{method}"
clip = 0.5
bits = 16
stage_timeout = {stage_timeout}
{neighbours}"""


MADE: list[Path] = []


class Run:
    """One deployment of a config: its tmp directory, clients, server, metrics and round walls."""

    def __init__(self, text: str, vanish: dict[int, set], stage: int):
        self.text, self.tmp = text, Path(tempfile.mkdtemp(prefix="atoll-secure-bench-"))
        MADE.append(self.tmp)  # removed when the bench ends
        (self.tmp / "exp.toml").write_text(text)
        (self.tmp / "answers").mkdir()
        cfg = config.load(self.tmp / "exp.toml")
        tokens = not cfg.secure.malicious  # malicious: the enrolment certificates sign the keys
        self.enrolled = local.prepare(cfg, self.tmp, tokens=tokens)
        self.server = Server(cfg, run_dir=self.tmp / "run", certs_dir=self.tmp / "certs", host="127.0.0.1",
                             port=0, auth="token" if tokens else "mtls", plots=False, linger_s=0.5)
        creds = (lambda e: {"token": e["token"]}) if tokens else (lambda e: {"cert": e["cert"], "key": e["key"]})
        self.clients = [Recorder(f"127.0.0.1:{self.server.port}", e["data"], ca=e["ca"], **creds(e),
                                 backoff=(0.01, 1.0), give_up_s=120, out=self.tmp / "answers",
                                 drops={r: stage for r, gone in vanish.items() if i in gone})
                        for i, e in enumerate(self.enrolled)]
        self.sessions, self.sums, self.summed = {}, {}, {}

    def run(self) -> "Run":
        sec, sums = self.server.coordinator.algorithm.secure, self.sums
        restore, mean = record_sessions(self.sessions), sec and type(sec).mean

        def capture(sec, total, setup, like, survivors):  # the unmasked ring sum, for the check
            sums[setup.round] = (total.copy(), setup, survivors)
            return mean(sec, total, setup, like, survivors)

        def inputs(server, answers):  # whose masked inputs the server summed, for the check
            self.summed[server.setup.round] = set(server.inputs)
            return finish(server, answers)

        finish = secagg.Server.finish
        if sec is not None:
            type(sec).mean = capture
            secagg.Server.finish = inputs
        try:
            threads = [threading.Thread(target=quiet(c.run), daemon=True) for c in self.clients]
            for t in threads + [serving := threading.Thread(target=self.server.run, daemon=True)]:
                t.start()
            serving.join(1200)
            end = time.monotonic() + 5  # a client still away (vanished) is not waited for
            for t in threads:
                t.join(max(0.0, end - time.monotonic()))
        finally:
            restore()
            if sec is not None:
                type(sec).mean = mean
                secagg.Server.finish = finish
        (self.tmp / "run" / "params.sha256").write_text(params_digest(self.server.coordinator.state.params))
        read = lambda f: [json.loads(ln) for ln in (self.tmp / "run" / f).read_text().splitlines()]  # noqa: E731
        self.lines, timings = read("metrics.jsonl"), read("timings.jsonl")
        self.walls = [b["wall_s"] - a["wall_s"] for a, b in zip([{"wall_s": 0.0}] + timings, timings)]
        return self

    def check_sums(self, vanish: dict[int, set], stage: int) -> str:
        """Every round's secure sum is the ring sum of its survivors' encoded inputs, exactly."""
        sec = self.server.coordinator.algorithm.secure
        for r, (total, setup, count) in sorted(self.sums.items()):
            alive = [c for c in self.clients if r in c.inputs and (stage > 3 or c.cid not in vanish.get(r, ()))
                     and c.cid in self.summed.get(r, ())]  # with --quorum the slowest may be cut too
            if any(c in vanish.get(r, ()) for c in self.summed.get(r, ())) and stage <= 3:
                raise SystemExit(f"round {r}: a vanished client's input was summed")
            want = sum(sec.ring(c.inputs[r], setup) for c in alive) & np.uint64((1 << setup.bits) - 1)
            if count != len(alive) or not np.array_equal(total, want):
                raise SystemExit(f"round {r}: the secure sum is not the sum of the {len(alive)} survivors' inputs")
        return f"exact: each round's unmasked sum = the ring sum of its {count} survivors' encoded inputs"


def figures(a, run: Run, base: Run) -> None:
    lines = run.lines
    med = lambda key, i=None: statistics.median(  # noqa: E731
        ln[key] if i is None else ln[key][i] for ln in lines)
    d = sum(p.numel() for p in run.server.coordinator.state.params.values()) + 1
    print(f"{a.method}, n = {a.clients}, neighbours = {a.neighbours if a.method == 'secagg+' else a.clients - 1}, "
          f"d = {d}, {lines[0].get('secure_bits')}-bit ring, {a.rounds} rounds, loopback TLS, dropout "
          f"{a.dropout:g} at stage {a.drop_stage}, stage_timeout {a.stage_timeout:g} s")
    print("stage       wall s   survivors   request B/client   answer B/client")
    stages = ["1 keys", "2 shares", "3 masked", "4 check", "5 unmask"] if a.malicious else \
        ["1 keys", "2 shares", "3 masked", "4 unmask"]
    for i, name in enumerate(stages):
        print(f"{name:10} {med('secure_stage_s', i):7.3f}   {med('secure_stage_survivors', i):9.0f}"
              f"   {med('secure_stage_bytes_down', i):16.0f}   {med('secure_stage_bytes_up', i):15.0f}")
    secure_s, plain_s = statistics.median(run.walls), statistics.median(base.walls)
    print(f"round walls s (training + stages + server step): {fmt(run.walls)}; the same deployment "
          f"{'semi-honest' if a.malicious else 'without [secure]'}: {fmt(base.walls)} "
          f"(ratio of medians {secure_s / plain_s:.2f}x)")
    print(f"crypto s (thread CPU): slowest client {med('secure_client_s'):.4f}, server {med('secure_server_s'):.4f}"
          f" (per round: clients {[ln['secure_client_s'] for ln in lines]}, server "
          f"{[ln['secure_server_s'] for ln in lines]})")
    if a.malicious:
        base_med = lambda key: statistics.median(ln[key] for ln in base.lines)  # noqa: E731
        print(f"semi-honest crypto s: slowest client {base_med('secure_client_s'):.4f}, "
              f"server {base_med('secure_server_s'):.4f}; bytes per client up "
              f"{sum(base.lines[0]['secure_stage_bytes_up'])}, down {sum(base.lines[0]['secure_stage_bytes_down'])}"
              f" (malicious: up {sum(lines[0]['secure_stage_bytes_up'])}, down "
              f"{sum(lines[0]['secure_stage_bytes_down'])})")
    print(f"train loss round {lines[-1]['round']}: {lines[-1]['train_loss']:.4f}, "
          f"test acc {lines[-1].get('test_acc', float('nan')):.4f}")


def fmt(walls) -> str:
    return "[" + ", ".join(f"{w:.2f}" for w in walls) + "]"


def replayed(a, run: Run, base: Run) -> None:
    """Both runs again, the server in its own process, the clients stubs that sleep their CPU."""
    timeout = f"stage_timeout = {a.replay_stage_timeout}\n"
    text = run.text.replace(f"stage_timeout = {a.stage_timeout}\n", timeout)
    try:
        walls, waits = replay(run.tmp, text, run.enrolled, [c.log for c in run.clients], run.sessions)
    finally:  # the other replay runs even where this one failed
        base_walls, _ = replay(base.tmp, base.text, base.enrolled, [c.log for c in base.clients], {})
        print(f"  replayed without [secure]: round walls {fmt(base_walls)} s")
    cpu = lambda r, k: [c.log[f"{r}/{k}"]["cpu"] for c in run.clients if "cpu" in c.log.get(f"{r}/{k}", {})]  # noqa: E731
    rounds = range(1, a.rounds + 1)
    print(f"replay (server in its own process, {a.clients} stub clients sleeping their recorded CPU "
          f"seconds; stage_timeout {a.replay_stage_timeout:g} s): requests and results = the recording")
    print(f"  recorded client CPU s per round, slowest: training {[round(max(cpu(r, 0)), 3) for r in rounds]}"
          f", stages {[[round(max(cpu(r, k), default=0), 3) for k in range(1, 5)] for r in rounds]}")
    rl = [json.loads(ln) for ln in (run.tmp / "replay-run" / "metrics.jsonl").read_text().splitlines()]
    print(f"  secure: round walls {fmt(walls)} s, stage walls {[ln['secure_stage_s'] for ln in rl]}, "
          f"server crypto s {[ln['secure_server_s'] for ln in rl]}")
    print(f"  of which waiting for the vanished clients (stages open after the last survivor's answer): {fmt(waits)} s")
    print(f"  without [secure]: round walls {fmt(base_walls)} s")
    later = lambda w: statistics.median(w[1:] or w)  # noqa: E731 (round 1 includes the connections)
    busy = [w - i for w, i in zip(walls, waits)]
    print(f"  ratio (median of rounds 2..): {later(walls) / later(base_walls):.2f}x "
          f"({later(walls):.2f} s / {later(base_walls):.2f} s); without the wait for the vanished: "
          f"{later(busy) / later(base_walls):.2f}x ({later(busy):.2f} s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="secagg+", choices=["secagg", "secagg+"])
    ap.add_argument("--neighbours", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--malicious", action="store_true", help="[secure] malicious = true, against semi-honest")
    ap.add_argument("--dropout", type=float, default=0.0, help="fraction of clients that vanish each round")
    ap.add_argument("--drop-stage", type=int, default=3, choices=[1, 2, 3, 4])
    ap.add_argument("--stage-timeout", type=float, default=60.0)
    ap.add_argument("--quorum", action="store_true", help="secure.stage_quorum = 1 - dropout: a stage "
                    "closes once that share answered, plus as long again (the plaintext round closes at "
                    "min_fraction = 1 - dropout)")
    ap.add_argument("--replay", action="store_true", help="record, then replay with stub clients")
    ap.add_argument("--replay-stage-timeout", type=float, default=10.0)
    a = ap.parse_args()
    if a.replay and a.malicious:
        ap.error("--replay replays token-enrolled semi-honest runs only")
    if a.replay:
        torch.set_num_threads(1)  # a client's CPU seconds are its thread's
    logging.getLogger("atoll.deploy").setLevel(logging.ERROR)  # the clients' policy notes
    fraction = f"min_fraction = {1 - a.dropout:.6g}\n" if a.dropout else ""
    text = TOML.format(rounds=a.rounds, clients=a.clients, hidden=a.hidden, method=a.method,
                       min_fraction="",
                       stage_timeout=a.stage_timeout,
                       neighbours=f"neighbours = {a.neighbours}\n" if a.method == "secagg+" else "")
    t0 = time.perf_counter()
    base = text.split("[secure]")[0].replace("round_timeout = 120\n", "round_timeout = 120\n" + fraction)
    if a.quorum:
        text += f"stage_quorum = {1 - a.dropout:.6g}\n"
    if a.malicious:
        text, base = text + "malicious = true\n", text
    vanish = drops(a.clients, a.dropout, a.rounds)
    try:
        run = Run(text, vanish, a.drop_stage).run()
        base_run = Run(base, vanish, a.drop_stage if a.malicious else 0).run()
        figures(a, run, base_run)
        print(run.check_sums(vanish, a.drop_stage) + f" ({time.perf_counter() - t0:.1f} s in all)")
        if a.replay:
            replayed(a, run, base_run)
    finally:
        for tmp in MADE:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
