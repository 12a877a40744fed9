"""Gradient leakage: what a curious server reconstructs from one client's update.

The attacks see what the server sees: the update a client sends after one local step on one
batch (FedSGD; ``update = -lr * gradient``, so the gradient is known up to the public lr).

- ``idlg_label``: the label of a batch of one from the sign of the last layer's bias gradient
  (``softmax - onehot`` is negative only at the true class; Zhao et al. 2020, iDLG);
- ``analytic_fc``: the input of a fully connected first layer, ``x = dL/dW_i / dL/db_i`` for any
  unit i with a nonzero bias gradient (exact for a batch of one; Phong et al. 2017, Geiping
  et al. 2020 sec. 4);
- ``dlg``: optimise a dummy input until its gradient matches (L-BFGS on the squared distance;
  Zhu et al. 2019), with the iDLG label;
- ``inverting_gradients``: Adam on ``1 - cosine(grad(x), g) + tv * TV(x)`` with the input kept
  in range (Geiping et al. 2020).
Quality: PSNR and SSIM (scikit-image) on the images, the inputs reshaped to ``side x side``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.func import functional_call


def gradient(model, params: dict, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of the mean cross-entropy of batch ``(x, y)`` at ``params``."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = torch.nn.functional.cross_entropy(functional_call(model, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), create_graph=x.requires_grad)))


def layers(params: dict) -> tuple[str, str, str, str]:
    """Names of the first layer's (weight, bias) and the last layer's (weight, bias)."""
    mats = [k for k, v in params.items() if v.dim() == 2]
    biases = [k for k, v in params.items() if v.dim() == 1]
    if not mats or len(biases) < 2:
        raise ValueError("leakage: the analytic and label attacks need a model whose first and "
                         "last layers are fully connected with biases")
    return mats[0], biases[0], mats[-1], biases[-1]


def idlg_label(grads: dict) -> int:
    _, _, _, last_b = layers(grads)
    return int(grads[last_b].argmin())


def analytic_fc(grads: dict) -> torch.Tensor:
    w, b, _, _ = layers(grads)
    i = int(grads[b].abs().argmax())
    if float(grads[b][i].abs()) == 0.0:
        raise ValueError("leakage: every first-layer bias gradient is zero")
    return grads[w][i] / grads[b][i]


def dlg(model, params: dict, target: dict, n_features: int, label: int, steps: int = 100,
        seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = next(iter(params.values())).dtype
    x = torch.rand(1, n_features, generator=g, dtype=dtype).requires_grad_(True)
    y = torch.tensor([label])
    opt = torch.optim.LBFGS([x], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        got = gradient(model, params, x, y)
        loss = sum(((got[k] - target[k]) ** 2).sum() for k in target)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()[0]


def tv(img: torch.Tensor) -> torch.Tensor:
    return (img[1:, :] - img[:-1, :]).abs().mean() + (img[:, 1:] - img[:, :-1]).abs().mean()


def inverting_gradients(model, params: dict, target: dict, n_features: int, label: int,
                        steps: int = 300, tv_weight: float = 1e-2, lo: float = 0.0, hi: float = 1.0,
                        seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = next(iter(params.values())).dtype
    side = math.isqrt(n_features)
    x = (lo + (hi - lo) * torch.rand(1, n_features, generator=g, dtype=dtype)).requires_grad_(True)
    y = torch.tensor([label])
    flat_t = torch.cat([t.reshape(-1) for t in target.values()])
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        got = gradient(model, params, x, y)
        flat = torch.cat([got[k].reshape(-1) for k in target])
        loss = 1 - torch.nn.functional.cosine_similarity(flat, flat_t, dim=0)
        if side * side == n_features:
            loss = loss + tv_weight * tv(x[0].reshape(side, side))
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    return x.detach()[0]


def quality(truth: torch.Tensor, guess: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> dict:
    """PSNR (dB) and SSIM of ``guess`` against ``truth``, both clipped to ``[lo, hi]``."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    t = truth.detach().double().clamp(lo, hi).numpy()
    g = guess.detach().double().clamp(lo, hi).numpy()
    side = math.isqrt(t.size)
    out = {"psnr": float(peak_signal_noise_ratio(t, g, data_range=hi - lo)) if not np.array_equal(t, g)
           else float("inf")}
    if side * side == t.size and side >= 7:
        out["ssim"] = float(structural_similarity(t.reshape(side, side), g.reshape(side, side),
                                                  data_range=hi - lo, win_size=7))
    return out


def private(grads: dict, clip: float, sigma: float, seed: int) -> dict:
    """The update a DP client sends: the gradient clipped to L2 norm ``clip`` plus Gaussian
    noise of standard deviation ``sigma * clip`` (drawn from the client's own generator)."""
    norm = torch.sqrt(sum((v ** 2).sum() for v in grads.values()))
    scale = min(1.0, clip / max(float(norm), 1e-30))
    g = torch.Generator().manual_seed(seed)
    return {k: v * scale + sigma * clip * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in grads.items()}


def top_k(grads: dict, fraction: float) -> dict:
    """The update a top-k client sends: the ``fraction`` of all coordinates largest in magnitude
    (global, as ``comm.uplink = "topk"``), the rest zero."""
    flat = torch.cat([v.reshape(-1) for v in grads.values()])
    keep = torch.zeros_like(flat)
    idx = flat.abs().topk(max(1, int(fraction * flat.numel()))).indices
    keep[idx] = flat[idx]
    out, at = {}, 0
    for k, v in grads.items():
        out[k], at = keep[at:at + v.numel()].reshape(v.shape), at + v.numel()
    return out


def gaussian_sigma(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier of one Gaussian release (sensitivity 1) that is
    (epsilon, delta)-DP: the analytic Gaussian mechanism (Balle & Wang 2018),
    ``delta = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s)``, solved by bisection."""
    from scipy.stats import norm

    def dlt(s):
        return norm.cdf(0.5 / s - epsilon * s) - math.exp(epsilon + norm.logcdf(-0.5 / s - epsilon * s))

    lo, hi = 1e-5, 1e3  # e^eps in log space: no overflow at large epsilon
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if dlt(mid) > delta else (lo, mid)
    return hi


def audit(model, params: dict, xs: torch.Tensor, ys: torch.Tensor, epsilons=(1, 2, 4, 8, 16, 64),
          delta: float = 1e-5, clip: float = 1.0, iterative: bool = False,
          prior: torch.Tensor | None = None, raw: tuple | None = None) -> dict:
    """The battery on samples ``xs`` (batch 1 each): label recovery, the analytic attack (and DLG
    / inverting gradients when ``iterative``) with no defence, then the analytic attack against
    a clipped and noised update for each epsilon (one Gaussian release, add/remove, PLD).
    ``prior``: the guess of an attacker who saw no update, only the data's distribution (the
    mean training input; by default each sample's leave-one-out mean of ``xs``); its PSNR is the
    floor a PSNR is read against (a mostly blank image set scores high for any blank guess).
    ``raw``: ``(mean, std)`` of a standardisation the inputs went through; truths and guesses
    are scored in raw units (pixels), over the raw range of ``xs``, as image PSNR is reported.
    Returns ``{"none": {...}, "prior": {...}, "dp": [{"epsilon", "sigma", "psnr", "label_rate"},
    ...], "compressed": [...], "secure": [...]}``."""
    n = len(xs)
    score = _scorer(xs, raw)
    guess = [prior if prior is not None else (xs.sum(0) - xs[i]) / max(n - 1, 1) for i in range(n)]
    base = [score(xs[i], guess[i]) for i in range(n)]
    grads = [gradient(model, params, xs[i:i + 1], ys[i:i + 1]) for i in range(n)]
    labels = np.mean([idlg_label(g) == int(ys[i]) for i, g in enumerate(grads)])
    analytic = [score(xs[i], analytic_fc(g)) for i, g in enumerate(grads)]
    out = {"none": {"label_rate": float(labels), "analytic_psnr": _mean(analytic, "psnr"),
                    "analytic_ssim": _mean(analytic, "ssim")}, "dp": [],
           "prior": {"psnr": _mean(base, "psnr"), "ssim": _mean(base, "ssim")}}
    if iterative:
        for name, fn in (("dlg", dlg), ("inverting", inverting_gradients)):
            q = [score(xs[i], fn(model, params, g, xs.shape[1], idlg_label(g)))
                 for i, g in enumerate(grads)]
            out["none"][f"{name}_psnr"], out["none"][f"{name}_ssim"] = _mean(q, "psnr"), _mean(q, "ssim")
    for eps in epsilons:
        sigma = gaussian_sigma(eps, delta)
        noisy = [private(g, clip, sigma, seed=1000 + i) for i, g in enumerate(grads)]
        q = [score(xs[i], analytic_fc(g)) for i, g in enumerate(noisy)]
        rate = np.mean([idlg_label(g) == int(ys[i]) for i, g in enumerate(noisy)])
        out["dp"].append({"epsilon": eps, "sigma": sigma, "psnr": _mean(q, "psnr"),
                          "ssim": _mean(q, "ssim"), "label_rate": float(rate)})
    out["compressed"] = [_compressed(xs, ys, grads, f, score) for f in (0.1, 0.01)]
    out["secure"] = [_secure(xs, ys, grads, k, score) for k in (2, 10) if k <= n]
    return out


def _scorer(xs: torch.Tensor, raw: tuple | None):
    """``quality`` of a guess against a truth, in raw units (``raw = (mean, std)``) over the raw
    range of ``xs``."""
    mean, std = raw if raw is not None else (0.0, 1.0)
    unscaled = xs * std + mean
    lo, hi = float(unscaled.min()), float(unscaled.max())
    return lambda truth, guess: quality(truth * std + mean, guess * std + mean, lo, hi)


def _compressed(xs, ys, grads, fraction, score) -> dict:
    """The analytic and label attacks against each sample's top-k update."""
    sent = [top_k(g, fraction) for g in grads]
    guesses = [_analytic_or_blank(g, xs[i]) for i, g in enumerate(sent)]
    q = [score(xs[i], guess) for i, (guess, _) in enumerate(guesses)]
    rate = np.mean([idlg_label(g) == int(ys[i]) for i, g in enumerate(sent)])
    return {"topk_fraction": fraction, "psnr": _mean(q, "psnr"), "ssim": _mean(q, "ssim"),
            "analytic_applies_rate": float(np.mean([ok for _, ok in guesses])),
            "label_rate": float(rate)}


def _analytic_or_blank(grads: dict, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The analytic guess, or a blank input where compression dropped every first-layer bias
    gradient (the attack does not apply; the attacker is left guessing)."""
    try:
        return analytic_fc(grads), True
    except ValueError:
        return torch.zeros_like(like), False


def _secure(xs, ys, grads, k, score) -> dict:
    """What a server that sees only the sum of ``k`` clients' updates (one sample each) gets:
    the analytic attack on the sum, scored against the input it resembles most (the attacker's
    best case), and whether the iDLG label is one of the ``k`` labels."""
    best, hits = [], []
    for s in range(0, len(xs) - k + 1, k):
        total = {name: sum(grads[i][name] for i in range(s, s + k)) for name in grads[s]}
        guess = analytic_fc(total)
        best.append(max((score(xs[i], guess) for i in range(s, s + k)), key=lambda r: r["psnr"]))
        hits.append(idlg_label(total) in {int(ys[i]) for i in range(s, s + k)})
    return {"clients": k, "psnr": _mean(best, "psnr"), "ssim": _mean(best, "ssim"),
            "label_in_cohort_rate": float(np.mean(hits))}


def _mean(rows, key):
    vals = [r[key] for r in rows if key in r]
    finite = [v for v in vals if math.isfinite(v)]
    return float(np.mean(finite)) if finite else (float("inf") if vals else float("nan"))
