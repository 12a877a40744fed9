"""Local-DP noise codecs: each client perturbs its own update before it leaves the device.

``gaussian_noise(noise_multiplier, sensitivity)`` adds i.i.d. ``N(0, (noise_multiplier *
sensitivity)^2)`` to every coordinate and declares ``GaussianDpEvent(noise_multiplier)``;
``laplace_noise(b, sensitivity)`` adds i.i.d. ``Laplace(0, b * sensitivity)`` and declares
``LaplaceDpEvent(b)`` (pure ``1/b``-DP). ``sensitivity`` is the largest change of the encoded
tree between neighbouring inputs: L2 for Gaussian (``c`` after ``clip_l2(c)``), L1 for Laplace
(e.g. ``d * c`` after ``clip_linf(c)`` on ``d`` coordinates). Use them behind a clip:
``chain(clip_l2(c), gaussian_noise(z, c))``.

Both are unbiased and linear (decoding is the identity, so it commutes with a secure sum).
Noise comes from ``rng.generator(key)``: reproducible in simulation. In a deployment the
client's uplink key is ``rng.private_key`` of a secret only the client holds (``deploy.Client``),
or the server could regenerate the noise.
"""
from __future__ import annotations

import torch

from atoll import rng
from atoll.codecs.base import Codec


def gaussian_noise(noise_multiplier: float, sensitivity: float) -> Codec:
    """Add Gaussian noise of std ``noise_multiplier * sensitivity`` to every coordinate."""
    _positive(sensitivity, "gaussian_noise: sensitivity")
    _positive(noise_multiplier, "gaussian_noise: noise_multiplier")
    std = noise_multiplier * sensitivity

    def encode(tree, state, key):
        g = rng.generator(key)
        return {k: v + std * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
                for k, v in tree.items()}, state

    from atoll.privacy import events  # lazy: dp-accounting loads only when needed

    return Codec(f"gaussian_noise({noise_multiplier:g},{sensitivity:g})", init=lambda tree: (),
                 encode=encode, decode=dict, event=events.gaussian(noise_multiplier))


def laplace_noise(b: float, sensitivity: float) -> Codec:
    """Add Laplace noise of scale ``b * sensitivity`` to every coordinate."""
    _positive(sensitivity, "laplace_noise: sensitivity")
    _positive(b, "laplace_noise: b")
    scale = b * sensitivity

    def encode(tree, state, key):
        g = rng.generator(key)
        out = {}
        for k, v in tree.items():
            u = torch.rand(v.shape, generator=g, dtype=torch.float64) - 0.5  # U(-1/2, 1/2)
            lap = -scale * torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 2**-54))  # inverse CDF
            out[k] = v + lap.to(v.dtype)
        return out, state

    from atoll.privacy import events  # lazy: dp-accounting loads only when needed

    return Codec(f"laplace_noise({b:g},{sensitivity:g})", init=lambda tree: (), encode=encode,
                 decode=dict, event=events.laplace(b))


def _positive(x: float, what: str) -> None:
    if not x > 0:
        raise ValueError(f"{what} must be > 0, got {x}")
