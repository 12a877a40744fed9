"""Simulation speed: training samples per second of LoopRuntime, VmapRuntime and RayRuntime
against plain centralized PyTorch training of the same model, same batch size, same samples;
peak memory with 10,000 stateful clients; time from `atoll run` to the first finished round.

    .venv/bin/python bench/simulation_speed.py                 # everything, about 4 minutes
    .venv/bin/python bench/simulation_speed.py A C memory      # a subset (A B C C64 memory startup)
    .venv/bin/python bench/simulation_speed.py A noray         # without RayRuntime

Workloads (1 local epoch, batch 10, SGD lr 0.05, FedAvg):
  A    2NN (MLP 784-200-200-10), 60,000 synthetic samples, 100 IID clients, 10 per round
  B    the same, 1,000 clients, 100 per round
  C    digits (64 features) over 1,000 clients (1-2 samples each), 100 per round, 2NN 64-200-200-10
  C64  C with the quickstart model (MLP 64-64-10)
samples/s = all training samples of the measured rounds / their wall seconds (after one warm-up
round). Centralized: plain torch.optim.SGD over the same samples at batch 10, with 1 and with 2
torch threads. Centralized and VmapRuntime are measured in turn, three times each, and the best
of each is kept (`workload`). LoopRuntime: the faster of 1 and 2 threads. VmapRuntime and
RayRuntime choose their own threads (printed).
"""
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atoll import algorithms, data, models, sampling, transforms
from atoll.client import model_loss, params_of
from atoll.runtime.base import LocalWork
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime

ROOT = Path(__file__).resolve().parents[1]
CEILING = 100_000  # samples/s of the 2NN on this 2-core machine: ~1 MFLOP/sample at ~100 GFLOP/s
WORK = LocalWork(batch_size=10, epochs=1)
SPECS = {"A": (100, 10, "synthetic", [200, 200]), "B": (1000, 100, "synthetic", [200, 200]),
         "C": (1000, 100, "digits", [200, 200]), "C64": (1000, 100, "digits", [64])}


def synthetic(n=60_000, seed=0):
    """60,000 samples of 784 features, 10 classes: class centres plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(10, 784, generator=g)[y] + 2.0 * torch.randn(n, 784, generator=g)
    return x, y


def federated(name, clients):
    if name == "digits":
        return data.build(data.load("digits"), num_clients=clients, partition="iid",
                          test_fraction=0.2, client_test_fraction=0.0)
    x, y = synthetic()  # clients' rows are consecutive views of x, y, as data.build lays them out
    per, none = x.shape[0] // clients, torch.zeros(0, dtype=torch.long)
    shares = [data.ClientData(x[i * per:(i + 1) * per], y[i * per:(i + 1) * per], x[:0], none)
              for i in range(clients)]
    return data.FederatedData("synthetic", shares, x[:1000].clone(), y[:1000].clone(), 784, 10)


def model_fn(n_features, hidden):
    def make():
        torch.manual_seed(0)
        return models.build("mlp", n_features, 10, hidden=hidden)
    return make


def _cpu_busy(seconds=1.0) -> float:
    """Fraction of the machine's CPU time that was busy over ``seconds`` (Linux /proc/stat)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]
    (t0, i0), _ = read(), time.sleep(seconds)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


BUSY = []


def quiet(max_wait=90.0) -> None:
    """Wait until no other process loads the cores (< 10% busy over 1 s): on a shared 2-core
    machine one busy neighbour stalls every 2-thread OpenMP region and halves the figures."""
    if not os.path.exists("/proc/stat"):
        return
    t0 = time.perf_counter()
    busy = _cpu_busy()
    while busy > 0.10 and time.perf_counter() - t0 < max_wait:
        busy = _cpu_busy()
    BUSY.append(busy)


def centralized(make, fed, threads, samples=6000, repeats=3) -> float:
    """Plain PyTorch at batch 10 over (up to) ``samples`` of the clients' training samples."""
    torch.set_num_threads(threads)
    x = torch.cat([c.x for c in fed.clients])[:samples]
    y = torch.cat([c.y for c in fed.clients])[:samples]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    quiet()
    best = 0.0
    for _ in range(repeats + 1):
        t = time.perf_counter()
        for i in range(0, len(y), 10):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[i:i + 10]), y[i:i + 10]).backward()
            opt.step()
        best = max(best, len(y) / (time.perf_counter() - t))
    return best


def run_rounds(runtime, make, fed, per_round, rounds, states=None, algorithm=None) -> float:
    """samples/s over ``rounds`` rounds after one warm-up round."""
    model = make()
    alg = algorithm or algorithms.fedavg(transforms.sgd(0.05))
    update = alg.client(model_loss(model))
    state, states = alg.init(params_of(model)), ({} if states is None else states)
    quiet()
    done = seconds = 0.0
    for r in range(rounds + 1):
        cohort = sampling.sample(len(fed.clients), r + 1, 0, count=per_round)
        t = time.perf_counter()
        state, states, _ = runtime.run_round(alg, update, state, states, cohort, fed, WORK, 0)
        if r:
            seconds += time.perf_counter() - t
            done += sum(fed.clients[c].n for c in cohort)
    return done / seconds


def setup(name):
    clients, per_round, source, hidden = SPECS[name]
    fed = federated(source, clients)
    return fed, model_fn(fed.n_features, hidden), per_round


def workload(name, repeats=3) -> dict:
    """LoopRuntime (faster of 1 and 2 threads), then ``repeats`` times in turn: centralized
    PyTorch (1 and 2 threads, two passes each) and VmapRuntime (its own threads, two windows of
    6 rounds); best of each. Interleaving
    gives both sides the same machine: on this shared host the speed of a whole process
    drifts by up to 40% over tens of seconds (every phase, Python included, slows alike)."""
    fed, make, per_round = setup(name)
    row, loops = {}, {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        loops[threads] = run_rounds(LoopRuntime(), make, fed, per_round, 2 if name in "AB" else 3)
    row["loop_threads"] = max(loops, key=loops.get)
    row["loop"] = loops[row["loop_threads"]]
    central, vmap = {1: 0.0, 2: 0.0}, 0.0
    for _ in range(repeats):
        for t in (1, 2):
            central[t] = max(central[t], centralized(make, fed, t, repeats=1))
        vm = VmapRuntime()  # a new runtime sets its threads again (centralized changed them)
        vmap = max(vmap, *(run_rounds(vm, make, fed, per_round, 6) for _ in range(2)))
    row["vmap"], row["vmap_engine"], row["central"] = vmap, vm._engine[1].name, (central[1], central[2])
    return row


def ray_phase(rows: dict) -> None:
    """RayRuntime, 2 local workers, after the other runtimes (a starting Ray instance keeps
    the cores busy for a few seconds)."""
    try:
        from atoll.runtime.ray import RayRuntime
    except ImportError:
        return
    rt = RayRuntime(workers=2)
    rt.start()
    print(f"{rt.describe()}: start-up {rt.startup_s:.1f} s (once per run: Ray and the workers; "
          "data and program are shipped once, in the first round)")
    for name, row in rows.items():
        fed, make, per_round = setup(name)
        row["ray"] = max(run_rounds(rt, make, fed, per_round, 6) for _ in range(3))
    rt.shutdown()


def print_table(rows: dict) -> None:
    print(f"\n{'':5s}{'loop':>9s}{'vmap':>9s}{'ray':>9s}{'central':>9s}  {'(1t / 2t)':17s}"
          f"{'vmap/cent':>10s}{'vmap/loop':>10s}{'ray/cent':>9s}{'vmap/ceil':>10s}")
    for name, r in rows.items():
        c1, c2 = r["central"]
        best = max(c1, c2)
        ray = r.get("ray")
        print(f"{name:5s}{r['loop']:9.0f}{r['vmap']:9.0f}{ray or float('nan'):9.0f}{best:9.0f}  "
              f"({c1:6.0f} / {c2:6.0f}){r['vmap'] / best:10.2f}{r['vmap'] / r['loop']:10.1f}"
              f"{(ray or float('nan')) / best:9.2f}{r['vmap'] / CEILING:10.2f}")
    print("samples/s; loop at its faster thread count, vmap engine per row: "
          + ", ".join(f"{n}: loop {r['loop_threads']}t, {r['vmap_engine']}" for n, r in rows.items()))
    print(f"vmap/ceil: fraction of the {CEILING:,} samples/s ceiling (meaningful for A and B)")


def memory_child() -> None:
    """10,000 clients with 2NN-sized state (error feedback), 100 per round, 5 rounds."""
    from atoll.codecs import build_codec
    from atoll.runtime.store import ClientStore

    fed = federated("synthetic", 10_000)
    make = model_fn(784, [200, 200])
    alg = algorithms.fedavg(transforms.sgd(0.05), uplink=build_codec("error_feedback(stochastic_quantize(8))"))
    with tempfile.TemporaryDirectory(dir=os.environ.get("ATOLL_STORE_DIR")) as tmp:
        store = ClientStore(10_000, {"uplink": alg.uplink.init(params_of(make()))}, path=tmp)
        rate = run_rounds(VmapRuntime(), make, fed, 100, 5, states=store, algorithm=alg)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{store.nbytes / 2**30:.2f} GiB of client state ({store!r}); "
              f"{rate:.0f} samples/s; peak RSS {peak:.2f} GiB")


def memory() -> None:
    print("\n10,000 clients x 2NN-sized per-client state, 100 per round (separate process):")
    out = subprocess.run([sys.executable, __file__, "_memory"], capture_output=True, text=True,
                         env=_env(), check=True)
    print("  " + out.stdout.strip().splitlines()[-1])


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def first_round_seconds(cmd, run_dir: Path, timeout=120) -> float:
    """Wall seconds from launching ``cmd`` to the first line of ``run_dir/metrics.jsonl``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    try:
        while time.perf_counter() - t0 < timeout:
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                return time.perf_counter() - t0
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
            time.sleep(0.01)
        raise TimeoutError(f"no round finished within {timeout} s")
    finally:
        proc.kill()
        proc.wait()


WIRED = ("import sys; from pathlib import Path; from atoll import config; "
         "from atoll.runtime import make_runtime; from atoll.simulation import simulate; "
         "cfg = config.load(sys.argv[1], sys.argv[3:]); a, m, d, p = config.build(cfg); "
         "simulate(a, m, d, p, run_dir=Path(sys.argv[2]), runtime=make_runtime(cfg.runtime), plots=False)")


def startup() -> None:
    x, y = synthetic()
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "a.npz"
        np.savez(npz, x=x.numpy(), y=y.numpy())
        conf, sets = str(ROOT / "examples/speed/2nn.toml"), ["--set", f'data.name="{npz}"']
        cli = first_round_seconds([sys.executable, "-m", "atoll.cli", "run", conf, *sets, "--quiet",
                                   "--out", f"{tmp}/cli"], Path(tmp) / "cli")
        wired = first_round_seconds([sys.executable, "-c", WIRED, conf, f"{tmp}/wired",
                                     f'data.name="{npz}"'], Path(tmp) / "wired")
    print(f"\ntime to the first finished round, workload A (examples/speed/2nn.toml, 60,000-sample "
          f".npz):\n  `atoll run` as the CLI is wired now: {cli:.2f} s;  "
          f"config -> build -> make_runtime(cfg.runtime) -> simulate: {wired:.2f} s")


def main(args) -> None:
    if args == ["_memory"]:
        return memory_child()
    names = [a for a in args if a in SPECS] or ([] if set(args) - {"noray"} else list(SPECS))
    print(VmapRuntime().describe())
    rows = {name: workload(name) for name in names}
    if rows and "noray" not in args:
        ray_phase(rows)
    if rows:
        print_table(rows)
        print(f"other load before each measurement: at most {max(BUSY):.0%} of the CPU "
              f"(measurements wait up to 90 s for < 10%)")
    if not args or "memory" in args:
        memory()
    if not args or "startup" in args:
        startup()


if __name__ == "__main__":
    main(sys.argv[1:])
