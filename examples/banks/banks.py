"""Five banks with machines 100x apart in speed: FedAvg against the calibrated algorithms.

Every round has a 0.5 s deadline, so the banks run between 1 and 100 local steps (banks.csv).
FedAvg then minimises a mixture weighted towards the fast banks; FedaGrac (seed 003),
SCAFFOLD and FedNova correct for it. Prints each algorithm's final global training loss (the
objective all of them should minimise) and held-out accuracy.
Run: PYTHONPATH=src python examples/banks/banks.py
"""
from atoll import config
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

RUNS = {
    "fedavg": ["algorithm.name=fedavg"],
    "fednova": ["algorithm.name=fednova"],
    "scaffold": ["algorithm.name=scaffold"],
    "fedagrac (seed, lam=0.1)": [],
    "fedagrac (published, lam=1)": ["algorithm.form=published", "algorithm.lam=1.0"],
}

cfg = config.load("examples/banks/banks.toml")
_, _, fed, plan = config.build(cfg)
steps = [plan.work.round_steps(c, 1, plan.seed, fed.clients[c].n) for c in range(len(fed.clients))]
print("bank  records  steps/round")
for i, (client, k) in enumerate(zip(fed.clients, steps)):
    print(f"{i:>4} {client.n:>8} {k:>12}")
print(f"\n{'algorithm':>28}  global train loss  test acc  sim. time")
for name, over in RUNS.items():
    alg, model, fed, plan = config.build(config.load("examples/banks/banks.toml", over))
    res = simulate(alg, model, fed, plan, plots=False, runtime=VmapRuntime())
    last = res.metrics[-1]
    print(f"{name:>28}  {last['global_train_loss']:17.5f}  {last['test_acc']:8.2%}  {last['sim_time']:7.1f} s", flush=True)
