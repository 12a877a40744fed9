"""Five hospitals: FedAvg and FedProx against each hospital training alone.

Every hospital's "alone" model trains on its own records for as many local steps as it would
run in the federation, and is tested on the same held-out set and on its own local test split.
Run: .venv/bin/python examples/healthcare/hospitals.py
"""
import copy

from atoll import config, data
from atoll.simulation import Plan, simulate

cfg = config.load("examples/healthcare/hospitals.toml")
results = {}
for name in ("fedavg", "fedprox"):
    c = config.load("examples/healthcare/hospitals.toml", [f"algorithm.name={name}"])
    alg, model, fed, plan = config.build(c)
    results[name] = simulate(alg, model, fed, plan, plots=False).final["test_acc"]

alg, model, fed, plan = config.build(cfg)
print(f"{'hospital':>8} {'records':>8} {'positives':>9}  alone: held-out acc")
for i, client in enumerate(fed.clients):
    alone = data.FederatedData(fed.name, [client], fed.x_test, fed.y_test, fed.n_features, fed.n_classes)
    solo = Plan(rounds=plan.rounds, seed=plan.seed, work=plan.work, federated_eval=False)
    acc = simulate(alg, copy.deepcopy(model), alone, solo, plots=False).final["test_acc"]
    pos = float(client.y.float().mean())
    print(f"{i:>8} {client.n:>8} {pos:>9.0%}  {acc:.2%}")
for name, acc in results.items():
    print(f"{name:>27}: held-out acc {acc:.2%}")
