"""Privacy accounting figures: published DP-SGD numbers, calibration, the GIH mechanism.

    .venv/bin/python bench/privacy_accountant.py

1. Published epsilons reproduced with the classical moments-accountant conversion, next to
   dp-accounting's improved RDP conversion and PLD, for the same runs:
   Abadi et al. 2016 (Sec. 5.2) and the TF-Privacy MNIST DP-SGD tutorial table
   (github.com/tensorflow/privacy, tutorials/README.md; N=60000, batch 256, delta=1e-5,
   steps = epochs * N // batch, RDP orders [1.1..10.9] + [12..63]).
2. Budget arithmetic: noise for a target epsilon, steps within a budget.
3. DP intrinsic quantization (US 11,017,322 B1): one round of the GIH PLD against direct
   quadrature, the exact delta floor, and epsilon for a few settings.
"""
import math
import time

from atoll import privacy as P
from atoll.codecs.intrinsic import levels
from atoll.privacy import irwin_hall as ih

PUBLISHED = [  # name, q, sigma, steps, delta, published epsilon
    ("Abadi et al. 2016", 0.01, 4.0, 10_000, 1e-5, 1.26),
    ("TF-Privacy MNIST, sigma 1.1, 60 ep", 256 / 60000, 1.1, 60 * 60000 // 256, 1e-5, 3.0),
    ("TF-Privacy MNIST, sigma 1.12, 60 ep", 256 / 60000, 1.12, 60 * 60000 // 256, 1e-5, 2.92),
    ("TF-Privacy MNIST, sigma 0.6, 30 ep", 256 / 60000, 0.6, 30 * 60000 // 256, 1e-5, 9.74),
    ("TF-Privacy MNIST, sigma 1.2, 10 ep", 256 / 60000, 1.2, 10 * 60000 // 256, 1e-5, 1.20),
]


def published():
    print("1. Published DP-SGD epsilons (Poisson-sampled Gaussian, add/remove neighbouring)")
    print(f"   {'run':38s} {'steps':>6s} {'published':>9s} {'classic':>8s} {'RDP':>8s} {'PLD':>8s}")
    for name, q, sigma, steps, delta, pub in PUBLISHED:
        t = P.privacy_table(q, sigma, steps, delta)
        print(f"   {name:38s} {steps:6d} {pub:9.2f} {t['rdp_classic']:8.3f} {t['rdp']:8.3f} {t['pld']:8.3f}")


def calibration():
    print("\n2. Budget arithmetic (q=0.01, delta=1e-5)")
    for target in (1.0, 3.0, 8.0):
        s_pld = P.noise_for_epsilon(target, 0.01, 10_000, 1e-5)
        s_rdp = P.noise_for_epsilon(target, 0.01, 10_000, 1e-5, kind="rdp")
        print(f"   noise for epsilon {target:3.0f} in 10000 steps: PLD {s_pld:.3f}, RDP {s_rdp:.3f}")
    for target in (1.0, 2.0):
        t_pld = P.steps_for_budget(target, 0.01, 4.0, 1e-5)
        t_rdp = P.steps_for_budget(target, 0.01, 4.0, 1e-5, kind="rdp")
        print(f"   steps within epsilon {target:3.0f} at sigma 4: PLD {t_pld}, RDP {t_rdp}")


GIH = [  # Z, C/Delta, d, q, rounds
    (3, 0.05, 100, 0.01, 100),
    (7, 0.05, 100, 0.01, 100),
    (7, 0.2, 10, 0.01, 1000),
    (7, 0.05, 10_000, 0.01, 100),
    (11, 0.02, 10_000, 0.01, 100),
]


def gih():
    print("\n3. DP intrinsic quantization: generalized Irwin-Hall mechanism (PLD, add/remove)")
    print("   (bits*: per coordinate at N_k = 1; Gauss eq.: Gaussian of equal variance, L2 sensitivity C*sqrt(d))")
    print("   one round, one coordinate: PLD delta vs scipy quadrature of the hockey-stick divergence")
    for n, c, q in ((2, 0.1, 1.0), (4, 0.25, 0.1)):
        pld = ih.round_pld(n, 1.0, c, 1, q, 1e-4)
        for eps in (0.5, 1.0):
            print(f"     Z={n - 1} C/Delta={c} q={q} eps={eps}: PLD {pld.get_delta_for_epsilon(eps):.10f}"
                  f"  quadrature {ih.hockey_stick_1d(n, c, q, eps):.10f}")
    print(f"   {'Z':>3s} {'C/D':>5s} {'d':>6s} {'q':>5s} {'T':>5s} {'bits*':>5s} {'delta floor':>12s}"
          f" {'eps(1e-5)':>10s} {'floor(PLD)':>12s} {'Gauss eq.':>9s} {'sec':>5s}")
    for z, c, d, q, rounds in GIH:
        t0 = time.perf_counter()
        acc = P.Accountant("pld")
        acc.step(P.intrinsic_quantization(z + 1, 1.0, c, d, q), rounds)
        eps = acc.epsilon(1e-5)
        sec = time.perf_counter() - t0
        floor = ih.delta_floor(z + 1, 1.0, c, d, q, rounds)
        bits = levels(1.0, z, c, 1.0)[1]
        # Gaussian of the same per-coordinate variance, L2 sensitivity C * sqrt(d)
        sigma = math.sqrt((z + 1) / 12) / (c * math.sqrt(d))
        gauss = P.epsilon(q, sigma, rounds, 1e-5)
        print(f"   {z:3d} {c:5.2f} {d:6d} {q:5.2f} {rounds:5d} {bits:5d} {floor:12.3e} {eps:10.3f}"
              f" {acc.delta(1e9):12.3e} {gauss:9.3f} {sec:5.1f}")


if __name__ == "__main__":
    published()
    calibration()
    gih()
