"""Privacy events: what one round (or one step) of a private mechanism releases.

Events are ``dp_accounting`` ``DpEvent`` objects, so any dp-accounting accountant can read them.
The helpers below build the common ones with the parameter conventions atoll uses:

* ``noise multiplier`` = noise standard deviation / L2 sensitivity (the clip norm);
* ``laplace(b)``: scale ``b`` relative to an L1 sensitivity of 1.

One atoll-specific event, ``IrwinHallDpEvent``, describes the DP intrinsic quantizer of
US 11,017,322 B1 (``atoll.codecs.intrinsic``); only atoll's PLD accountant composes it
(``atoll.privacy.irwin_hall``).

``to_dict`` / ``from_dict`` turn an event into plain JSON-able data and back (checkpoints).
"""
from __future__ import annotations

import importlib
from typing import Any

import attr
import dp_accounting as dpa
from dp_accounting import dp_event

DpEvent = dp_event.DpEvent

# Modules whose event classes ``from_dict`` may instantiate (never arbitrary imports).
_EVENT_MODULES = ("dp_accounting.dp_event", "atoll.privacy.events")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class IrwinHallDpEvent(DpEvent):
    """One round of DP intrinsic quantization (FIG. 4 of US 11,017,322 B1).

    The released quantity, in units of the *sum* of clipped per-sample gradients, is
    ``sum_j CL(grad_j) + width * (U_1 + ... + U_n)`` with ``n = uniforms`` i.i.d.
    ``U ~ Uniform[-1/2, 1/2]`` per coordinate (``Z`` added uniforms plus the dithered
    quantization error, see ``atoll.privacy.irwin_hall``). Every per-sample gradient is
    clipped to ``[-sensitivity, sensitivity]`` per coordinate and ``dimension`` coordinates
    are released at once. Records are Poisson-sampled with ``sampling_probability``; one coin
    per record covers all coordinates. Add/remove-one neighbouring only.
    """

    uniforms: int
    width: float
    sensitivity: float
    dimension: int
    sampling_probability: float = 1.0


def gaussian(noise_multiplier: float) -> DpEvent:
    """Gaussian mechanism with noise std = ``noise_multiplier`` x L2 sensitivity."""
    _positive("noise_multiplier", noise_multiplier, allow_zero=True)
    return dpa.GaussianDpEvent(float(noise_multiplier))


def poisson_gaussian(q: float, noise_multiplier: float) -> DpEvent:
    """One DP-SGD step: Poisson sampling at rate ``q`` then the Gaussian mechanism."""
    _probability("q", q)
    return dpa.PoissonSampledDpEvent(float(q), gaussian(noise_multiplier))


def zcdp(rho: float, xi: float = 0.0) -> DpEvent:
    """A mechanism that is ``(alpha, xi + rho alpha)``-RDP for every order (the Skellam
    mechanism's bound, ``atoll.secure.distributed``); RDP accountants only."""
    _positive("rho", rho)
    _positive("xi", xi, allow_zero=True)
    return dpa.ZCDpEvent(float(rho), float(xi))


def laplace(b: float) -> DpEvent:
    """Laplace mechanism with scale ``b`` relative to L1 sensitivity 1 (pure ``1/b``-DP)."""
    _positive("b", b)
    return dpa.LaplaceDpEvent(float(b))


def fixed_size_gaussian(n: int, N: int, noise_multiplier: float) -> DpEvent:  # noqa: N803
    """A batch of exactly ``n`` of ``N`` records drawn without replacement, then Gaussian.

    dp-accounting accounts for this event only under the *replace-one* neighbouring relation
    and only with its RDP accountant (Wang, Balle, Kasiviswanathan 2019): use
    ``Accountant("rdp", neighboring="replace_one")``.
    """
    if not 0 < n <= N:
        raise ValueError(f"fixed_size_gaussian: need 0 < n <= N, got n={n}, N={N}")
    return dpa.SampledWithoutReplacementDpEvent(int(N), int(n), gaussian(noise_multiplier))


def intrinsic_quantization(uniforms: int, width: float, sensitivity: float, dimension: int,
               q: float = 1.0) -> IrwinHallDpEvent:
    """The event of one DP intrinsic quantization round (see ``IrwinHallDpEvent``)."""
    if not 1 <= int(uniforms) <= 12:
        raise ValueError(f"intrinsic_quantization: uniforms must be in [1, 12], got {uniforms}")
    _positive("width", width)
    _positive("sensitivity", sensitivity)
    if int(dimension) < 1:
        raise ValueError(f"intrinsic_quantization: dimension must be >= 1, got {dimension}")
    _probability("q", q)
    return IrwinHallDpEvent(int(uniforms), float(width), float(sensitivity), int(dimension), float(q))


def repeated(event: DpEvent, count: int) -> DpEvent:
    """``count`` rounds of the same event."""
    return dpa.SelfComposedDpEvent(event, int(count))


def to_dict(event: DpEvent) -> dict[str, Any]:
    """Plain data (str, numbers, lists, dicts) describing ``event``; inverse of ``from_dict``."""
    out: dict[str, Any] = {"class": type(event).__name__, "module": type(event).__module__}
    for f in attr.fields(type(event)):
        out[f.name] = _encode(getattr(event, f.name))
    return out


def from_dict(data: dict[str, Any]) -> DpEvent:
    """Rebuild an event written by ``to_dict`` (only dp-accounting and atoll event classes)."""
    module = data.get("module")
    if module not in _EVENT_MODULES:
        raise ValueError(f"privacy event: module {module!r} is not an event module")
    cls = getattr(importlib.import_module(module), data["class"], None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, DpEvent)):
        raise ValueError(f"privacy event: {data.get('class')!r} is not a DpEvent class")
    kwargs = {k: _decode(v) for k, v in data.items() if k not in ("class", "module")}
    return cls(**kwargs)


def _encode(value):
    if isinstance(value, DpEvent):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict) and "class" in value:
        return from_dict(value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _probability(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
