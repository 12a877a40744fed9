"""DP-SGD speed: private (ghost clipping, materialised vmap(grad)) vs non-private local training.

    .venv/bin/python bench/privacy_dpsgd_speed.py [--threads 4] [--steps 50] [--batch 64] \
        [--opacus-python ../opacus-venv/bin/python]

The 2NN MLP 784-200-200-10 (McMahan et al. 2017), float32, batch 64, plain SGD, all in the
same process; prints samples/s and the slowdown of each private path relative to the
non-private ``local_training`` (target: ghost <= 3x). Input is random (speed does not depend
on it). With ``--opacus-python``, the same model, batch, steps and threads are also timed with
Opacus (installed in a *separate* environment, since atoll does not depend on it:
``python3 -m venv ../opacus-venv; ../opacus-venv/bin/pip install torch==2.13.0 opacus``),
in a subprocess: plain torch SGD there (the baseline of that process), Opacus hooks
(``GradSampleModule`` + ``DPOptimizer``, materialised per-sample gradients) and Opacus fast
gradient clipping (``use_ghost_clipping=True``).
"""
import argparse
import json
import os
import subprocess
import time

import torch

from atoll.client import local_training, model_loss, params_of
from atoll.models.zoo import mlp
from atoll.algorithms.dp import dp_local_training
from atoll.privacy.dpsgd import dp_inputs
from atoll.transforms.optim import sgd


def timed(update, params, batches, step_mask, key, repeats):
    update(params, {}, {}, batches, step_mask, key)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        update(params, {}, {}, batches, step_mask, key)
        best = min(best, time.perf_counter() - t0)
    return best


OPACUS = r"""
import json, sys, time, torch
from torch import nn
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
threads, s, b, repeats = map(int, sys.argv[1:5])
torch.set_num_threads(threads)
torch.manual_seed(0)
xs, ys = torch.randn(s, b, 784), torch.randint(0, 10, (s, b))
def mlp():
    return nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))
def plain():
    m = mlp(); opt = torch.optim.SGD(m.parameters(), lr=0.05); crit = nn.CrossEntropyLoss()
    def step(x, y):
        opt.zero_grad(); crit(m(x), y).backward(); opt.step()
    return step
def hooks():
    m = GradSampleModule(mlp())
    opt = DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), noise_multiplier=1.1, max_grad_norm=1.0,
                      expected_batch_size=b)
    crit = nn.CrossEntropyLoss()
    def step(x, y):
        opt.zero_grad(); crit(m(x), y).backward(); opt.step()
    return step
def ghost():
    m = GradSampleModuleFastGradientClipping(mlp(), max_grad_norm=1.0, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(m.parameters(), lr=0.05), noise_multiplier=1.1,
                                          max_grad_norm=1.0, expected_batch_size=b)
    crit = DPLossFastGradientClipping(m, opt, nn.CrossEntropyLoss(reduction="mean"))
    def step(x, y):
        opt.zero_grad(); crit(m(x), y).backward(); opt.step()
    return step
out = {}
for name, make in (("torch SGD (Opacus process)", plain), ("Opacus hooks", hooks),
                   ("Opacus ghost clipping", ghost)):
    step = make()
    for i in range(3):
        step(xs[i], ys[i])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(s):
            step(xs[i], ys[i])
        best = min(best, time.perf_counter() - t0)
    out[name] = s * b / best
print(json.dumps(out))
"""


def opacus_rates(python: str, threads: int, steps: int, batch: int, repeats: int) -> dict:
    """samples/s of Opacus in its own environment (a subprocess of ``python``)."""
    done = subprocess.run([python, "-c", OPACUS, str(threads), str(steps), str(batch), str(repeats)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--opacus-python", help="python of a separate environment with opacus")
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
    if args.opacus_python:
        rates = opacus_rates(args.opacus_python, args.threads, s, b, args.repeats)
        opacus_base = rates["torch SGD (Opacus process)"]
        print("Opacus (separate environment, same model, batch, steps and threads; slowdown "
              "relative to plain torch SGD in that process):")
        for name, rate in rates.items():
            print(f"  {name:28s} {rate:10.0f} samples/s   {opacus_base / rate:5.2f}x slower than non-private")


if __name__ == "__main__":
    main()
