"""Deployment at scale on loopback: 100 clients, a ~1M-parameter model, mutual TLS.

The coordinator runs in this process (so its CPU time and memory are this process's); the
clients run as threads in a few worker processes (100 Python processes would not fit in memory).
Client 0 joins alone first, so its join-to-first-task time is measured on an otherwise idle
server; the other 99 then join together. Afterwards the same config runs in simulation (loop and
vectorised runtimes) in child processes, timed after one warm-up round, for comparison.

    PYTHONPATH=src python bench/deploy_scale.py --rounds 200 --sim-rounds 20

Prints one JSON object with every figure; docs/deployment.md quotes them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIG = """
name = "deploy-scale"
rounds = {rounds}
[data]
name = "digits"
num_clients = {clients}
[model]
hidden = [1024, 896]
[client]
batch_size = 10
[sampling]
clients_per_round = {clients}
[eval]
every = 10
federated = false
[checkpoint]
every = 1
[deploy]
round_timeout = 300
"""


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS) or at its peak (VmHWM) of this process, in MB. (Not
    ru_maxrss: Linux carries it across exec, so a child would report its parent's peak.)"""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(port: int, workdir: Path, ids: list[int]) -> None:
    """Run clients ``ids`` as threads; print each one's join-to-first-task seconds."""
    import torch

    from atoll.deploy.client import Client

    torch.set_num_threads(1)  # many clients per process already share the cores
    clients = [Client(f"localhost:{port}", workdir / f"client-{i}.npz", ca=workdir / "certs/ca.pem",
                      cert=workdir / f"certs/clients/client-{i}.pem",
                      key=workdir / f"certs/clients/client-{i}.key") for i in ids]
    threads = [threading.Thread(target=c.run) for c in clients]
    for t in threads:
        t.start()
    if len(ids) == 1:
        while clients[0].first_task_s is None:
            time.sleep(0.01)
        print("FIRST", flush=True)
    for t in threads:
        t.join()
    print(json.dumps({"first_task_s": [c.first_task_s for c in clients],
                      "accepted": sum(c.counts["accepted"] for c in clients)}), flush=True)


def simulate_child(cfg_path: Path, runtime: str, rounds: int) -> None:
    from atoll import config
    from atoll.simulation import simulate

    cfg = config.load(cfg_path, [f"rounds={rounds}", f"runtime.name={runtime}"])
    algorithm, model, data, plan = config.build(cfg)
    warm = config.load(cfg_path, ["rounds=1", f"runtime.name={runtime}"])  # torch.func warm-up
    simulate(*config.build(warm), runtime=config.runtime(warm))
    cpu0, t0 = time.process_time(), time.perf_counter()
    simulate(algorithm, model, data, plan, runtime=config.runtime(cfg))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"runtime": runtime, "rounds": rounds, "rounds_per_min": 60 * rounds / wall,
                      "cpu_s_per_round": cpu / rounds,
                      "peak_rss_mb": rss_mb("VmHWM")}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--sim-rounds", type=int, default=20)
    args = ap.parse_args()
    from atoll import config
    from atoll.deploy import local
    from atoll.deploy.server import Server

    work = Path(tempfile.mkdtemp(prefix="atoll-deploy-scale-"))
    (work / "exp.toml").write_text(CONFIG.format(rounds=args.rounds, clients=args.clients))
    cfg = config.load(work / "exp.toml")
    local.prepare(cfg, work)
    server = Server(cfg, run_dir=work / "run", certs_dir=work / "certs", host="localhost", port=0,
                    plots=False, linger_s=1.0)
    n_params = sum(v.numel() for v in server.coordinator.state.params.values())
    samples, done = [], threading.Event()

    def monitor():
        seen = 0
        while not done.is_set():
            r = server.coordinator.state.round
            if r != seen:
                samples.append({"round": r, "t": time.perf_counter(), "cpu": time.process_time(),
                                "rss_mb": rss_mb()})
                seen = r
                if r % 10 == 0:
                    print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            time.sleep(0.005)

    cmd = [sys.executable, __file__, "--worker", str(server.port), str(work)]
    thread = threading.Thread(target=server.run)
    thread.start()
    threading.Thread(target=monitor, daemon=True).start()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    solo = subprocess.Popen(cmd + ["0"], stdout=subprocess.PIPE, text=True)
    assert solo.stdout.readline().strip() == "FIRST"
    rest = list(range(1, args.clients))
    procs = [subprocess.Popen(cmd + [str(i) for i in rest[k::args.procs]], stdout=subprocess.PIPE,
                              text=True) for k in range(args.procs)]
    thread.join()
    done.set()
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in [solo] + procs]
    first = sorted(s for o in outs[1:] for s in o["first_task_s"])
    steady = [s for s in samples if s["round"] >= 2]  # round 1 includes 100 clients starting up
    span = steady[-1]["t"] - steady[0]["t"]
    rss = [s["rss_mb"] for s in samples]
    sims = []
    for runtime in ("loop", "vmap"):
        out = subprocess.run([sys.executable, __file__, "--simulate", str(work / "exp.toml"), runtime,
                              str(args.sim_rounds)], capture_output=True, text=True, check=True)
        sims.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({
        "clients": args.clients, "worker_processes": args.procs, "params": n_params,
        "rounds": server.coordinator.state.round,
        "update_bytes": json.loads((work / "run/metrics.jsonl").read_text().splitlines()[-1])["bytes_up"] // args.clients,
        "deploy_rounds_per_min": 60 * (len(steady) - 1) / span,
        "server_cpu_s_per_round": (steady[-1]["cpu"] - steady[0]["cpu"]) / (len(steady) - 1),
        "server_rss_mb_first10": round(sum(rss[:10]) / len(rss[:10]), 1),
        "server_rss_mb_last10": round(sum(rss[-10:]) / len(rss[-10:]), 1),
        "server_rss_mb_max": round(max(rss), 1), "server_peak_rss_mb": rss_mb("VmHWM"),
        "round1_s_with_startup": samples[0]["t"] - t_start,
        "join_to_first_task_s_solo": outs[0]["first_task_s"][0],
        "join_to_first_task_s_99_together_median": first[len(first) // 2],
        "join_to_first_task_s_99_together_max": first[-1],
        "accepted_updates": sum(o["accepted"] for o in outs),
        "simulation": sims, "total_wall_s": time.perf_counter() - t_start,
        "total_server_cpu_s": time.process_time() - cpu_start}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), Path(sys.argv[3]), [int(i) for i in sys.argv[4:]])
    elif len(sys.argv) > 1 and sys.argv[1] == "--simulate":
        simulate_child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        main()
