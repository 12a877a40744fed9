"""The quickstart as a Python script: FedAvg on digits over 10 IID clients.

Run: .venv/bin/python examples/quickstart/digits.py
"""
from atoll import algorithms, data, models, transforms
from atoll.runtime.base import LocalWork
from atoll.simulation import Plan, simulate

fed = data.build(data.load("digits"), num_clients=10, partition="iid", seed=0)
model = models.build("mlp", fed.n_features, fed.n_classes, hidden=[64])
algorithm = algorithms.fedavg(transforms.sgd(0.1))
plan = Plan(rounds=30, seed=0, clients_per_round=10, work=LocalWork(batch_size=10, epochs=1))
result = simulate(algorithm, model, fed, plan, run_dir="runs/digits-script",
                  overwrite=True, progress=True)
print(f"test accuracy {result.final['test_acc']:.2%}, "
      f"client accuracy p10 {result.final['fed_acc_p10']:.2%}")
