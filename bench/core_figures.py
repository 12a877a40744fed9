"""Figures of the core issue, printed as tables (and compare plots under runs/figures/).

    .venv/bin/python bench/core_figures.py [digits|dirichlet|stragglers|determinism ...]

1. FedAvg on digits, IID over 10 clients (the quickstart config).
2. digits, Dirichlet(0.1) over 50 clients: FedAvg, FedProx and FedAdam after the same rounds.
3. Synthetic(1,1), 30 devices, 90% stragglers: FedAvg dropping them vs FedProx (mu=1) keeping
   their partial work (Li et al. 2020, Fig. 1).
4. Same config and seed twice: byte-identical metrics.jsonl.
"""
import sys
import time
from pathlib import Path

from atoll import config
from atoll.report import compare
from atoll.simulation import simulate

OUT = Path("runs/figures")


def run(path_or_text, name, overrides=()):
    if str(path_or_text).endswith(".toml"):
        cfg = config.load(path_or_text, list(overrides))
    else:
        cfg = config.load(text=path_or_text, overrides=list(overrides))
    alg, model, data, plan = config.build(cfg)
    t0 = time.perf_counter()
    res = simulate(alg, model, data, plan, run_dir=OUT / name, config_text=config.dumps(cfg),
                   overwrite=True)
    return res, time.perf_counter() - t0


def digits():
    res, sec = run("examples/quickstart/digits.toml", "digits-iid")
    print(f"digits IID, 10 clients, FedAvg, {res.final['rounds']} rounds: "
          f"test acc {res.final['test_acc']:.2%} ({sec:.1f} s)")


DIRICHLET = """
name = "digits-dir"
rounds = 50
[data]
name = "digits"
num_clients = 50
partition = "dirichlet"
alpha = 0.1
[model]
name = "mlp"
hidden = [64]
[client]
lr = 0.05
batch_size = 10
epochs = 5
[sampling]
clients_per_round = 10
[eval]
every = 5
"""


def dirichlet():
    rows = []
    for name, extra in (("fedavg", []), ("fedprox", ["algorithm.mu=0.1"]),
                        ("fedadam", ["algorithm.server_lr=0.01"])):
        res, sec = run(DIRICHLET, f"digits-dir-{name}", [f"algorithm.name={name}", *extra])
        rows.append((name, res.final["test_acc"], res.final["fed_acc_p10"], sec))
    compare([OUT / f"digits-dir-{n}" for n, *_ in rows], OUT / "digits-dir", labels=[r[0] for r in rows])
    print("digits, Dirichlet(0.1), 50 clients, 10 per round, 5 local epochs, 50 rounds")
    print(f"{'algorithm':10s} {'test acc':>9s} {'client p10':>11s} {'seconds':>8s}")
    for name, acc, p10, sec in rows:
        print(f"{name:10s} {acc:9.2%} {p10:11.2%} {sec:8.1f}")


def stragglers():
    path = "examples/fedprox/synthetic_stragglers.toml"
    rows = []
    for label, over in (("fedavg-drop", ["algorithm.name=fedavg", "client.drop_stragglers=true"]),
                        ("fedprox-keep-mu1", ["algorithm.name=fedprox", "client.drop_stragglers=false"]),
                        ("fedprox-keep-mu0", ["algorithm.name=fedprox", "algorithm.mu=0",
                                              "client.drop_stragglers=false"])):
        res, sec = run(path, f"synthetic-{label}", over)
        losses = [(m["round"], m["global_train_loss"]) for m in res.metrics if "global_train_loss" in m]
        curve = " ".join(f"{x:.3f}" for r, x in losses if r % 10 == 0)
        rows.append((label, res.final["test_acc"], curve, sec))
    compare([OUT / f"synthetic-{r[0]}" for r in rows], OUT / "synthetic", labels=[r[0] for r in rows])
    print("Synthetic(1,1), 30 devices, logreg, 20 epochs, 10 per round, 90% stragglers")
    for label, acc, curve, sec in rows:
        print(f"{label:18s} test acc {acc:.2%}  ({sec:.0f} s)  global training loss at rounds 10, 20, ...: {curve}")


def determinism():
    a, _ = run("examples/quickstart/digits.toml", "det-a", ["rounds=5"])
    b, _ = run("examples/quickstart/digits.toml", "det-b", ["rounds=5"])
    same = (OUT / "det-a/metrics.jsonl").read_bytes() == (OUT / "det-b/metrics.jsonl").read_bytes()
    print(f"same config and seed twice: metrics.jsonl byte-identical = {same}")


if __name__ == "__main__":
    todo = sys.argv[1:] or ["digits", "dirichlet", "stragglers", "determinism"]
    for name in todo:
        globals()[name]()
