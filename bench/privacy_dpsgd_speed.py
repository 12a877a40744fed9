"""DP-SGD speed: private (ghost clipping, materialised vmap(grad)) vs non-private local training.

    .venv/bin/python bench/privacy_dpsgd_speed.py [--threads 4] [--steps 50] [--batch 64]

The 2NN MLP 784-200-200-10 (McMahan et al. 2017), float32, batch 64, plain SGD, all in the
same process; prints samples/s and the slowdown of each private path relative to the
non-private ``local_training`` (target: ghost <= 3x). Input is random (speed does not depend
on it). Opacus is not compared (it is not installed in this environment).
"""
import argparse
import os
import time

import torch

from atoll.client import local_training, model_loss, params_of
from atoll.models.zoo import mlp
from atoll.privacy.dpsgd import dp_inputs, dp_local_training
from atoll.transforms.optim import sgd


def timed(update, params, batches, step_mask, key, repeats):
    update(params, {}, {}, batches, step_mask, key)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        update(params, {}, {}, batches, step_mask, key)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mlp(784, 10)
    params = params_of(model)
    s, b = args.steps, args.batch
    batches = {"x": torch.randn(s, b, 784), "y": torch.randint(0, 10, (s, b)),
               "mask": torch.ones(s, b, dtype=torch.bool)}
    step_mask = torch.ones(s, dtype=torch.bool)
    noisy = dp_inputs(batches, params, key=1)  # pre-drawn noise: time the maths, not the RNG
    runs = {
        "non-private local_training": (local_training(model_loss(model), sgd(0.05)), batches),
        "DP-SGD ghost clipping": (dp_local_training(model, sgd(0.05), 1.0, 1.1, 1.0, use_ghost=True), noisy),
        "DP-SGD vmap(grad)": (dp_local_training(model, sgd(0.05), 1.0, 1.1, 1.0, use_ghost=False), noisy),
    }
    print(f"2NN 784-200-200-10, batch {b}, {s} steps, float32, {args.threads} torch threads")
    base = None
    for name, (update, data) in runs.items():
        sec = timed(update, params, data, step_mask, 1, args.repeats)
        rate = s * b / sec
        base = base or rate
        print(f"  {name:28s} {rate:10.0f} samples/s   {base / rate:5.2f}x slower than non-private")


if __name__ == "__main__":
    main()
