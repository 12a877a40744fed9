"""Issue 5 figures: bytes each scheme needs to reach the accuracy of uncompressed FedAvg.

    .venv/bin/python bench/comm_figures.py [rounds]

digits, Dirichlet(0.1) over 50 clients, 10 per round, MLP 64-200-10 (15,010 parameters),
2 local epochs. Schemes: FedAvg float32; float16; 4-bit stochastic quantization; top-k 1% with
error feedback; count sketch (+ server top-k with error feedback); seed 004 (rand-k uplink,
server top-k with error feedback, per-client downlink deltas), alone and with an 8-bit
stochastic quantizer after rand-k; top-k 1% + 8-bit with error feedback up, seed 004 down. Every byte count is the length of
the real wire messages. The target is 0.95 x the best accuracy of float32 FedAvg.
Writes runs/figures/comm/compare.{png,md} and prints the table.
"""
import sys
import time
from pathlib import Path

from atoll import config
from atoll.report import compare, reach, read_metrics
from atoll.simulation import simulate

OUT = Path("runs/figures/comm")
BASE = """
name = "comm"
rounds = {rounds}
[data]
name = "digits"
num_clients = 50
partition = "dirichlet"
alpha = 0.1
[model]
name = "mlp"
hidden = [200]
[client]
lr = 0.05
batch_size = 10
epochs = 2
[sampling]
clients_per_round = 10
[eval]
every = 2
federated = false
"""
SCHEMES = [
    ("fedavg-f32", []),
    ("float16", ['comm.uplink="cast(float16)"']),
    ("sq-4bit", ['comm.uplink="stochastic_quantize(4)"']),
    ("topk1%-ef", ['comm.uplink="error_feedback(top_k(0.01))"']),
    ("sketch", ['comm.uplink="count_sketch(5, 600, estimator=mean)"', "comm.server_topk=0.02"]),
    ("seed004", ['comm.uplink="rand_k(0.03)"', "comm.server_topk=0.01", 'comm.downlink="client"']),
    ("seed004+sq8", ['comm.uplink="rand_k(0.1)+stochastic_quantize(8)"', "comm.server_topk=0.015",
                     "comm.server_topk_momentum=0.5", 'comm.downlink="client"']),
    ("topk+sq8-ef+004", ['comm.uplink="error_feedback(top_k(0.01)+stochastic_quantize(8))"',
                         "comm.server_topk=0.01", 'comm.downlink="client"']),
]


def main(rounds: int = 200) -> None:
    dirs, secs = [], {}
    for name, over in SCHEMES:
        cfg = config.load(text=BASE.format(rounds=rounds), overrides=over)
        alg, model, data, plan = config.build(cfg)
        t0 = time.perf_counter()
        simulate(alg, model, data, plan, run_dir=OUT / name, config_text=config.dumps(cfg), plots=False,
                 overwrite=True)
        secs[name] = time.perf_counter() - t0
        dirs.append(OUT / name)
    base = read_metrics(OUT / "fedavg-f32")
    target = 0.95 * max(r["test_acc"] for r in base if "test_acc" in r)
    table = compare(dirs, OUT, labels=[n for n, _ in SCHEMES], target_acc=target)
    up0 = reach(base, target, "bytes_up_cum")
    down0 = reach(base, target, "bytes_down_cum")
    print(f"digits Dir(0.1), 50 clients, 10/round, MLP 64-200-10, {rounds} rounds; "
          f"target {target:.2%} (0.95 x best float32 FedAvg)")
    print(f"{'scheme':16s} {'final':>7s} {'rounds':>7s} {'up MB':>8s} {'down MB':>8s} "
          f"{'up x':>7s} {'down x':>7s} {'sec':>6s}")
    for row, (name, _) in zip(table, SCHEMES):
        up, down = row["bytes_up_cum_to_target"], row["bytes_down_cum_to_target"]
        fx = (lambda a, b: f"{a / b:7.1f}" if a and b else "      -")
        print(f"{name:16s} {row['final_acc']:7.2%} {str(row['round_to_target']):>7s} "
              f"{(up or 0) / 1e6:8.3f} {(down or 0) / 1e6:8.3f} {fx(up0, up)} {fx(down0, down)} "
              f"{secs[name]:6.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
