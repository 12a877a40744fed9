"""What a server checks in one client's uplink message before it touches any state.

``decode_update(algorithm, message, params)`` is the one decoder of an uplink message that a
server trusts (the deployed coordinator, the reference and asynchronous runtimes, and the fast
runtimes for any message their screen doubts). It returns ``(delta, aux)`` only when

* the bytes are a well-formed ``wire`` message with no parts but ``delta/...`` and ``aux/...``;
* the uplink codec decodes ``delta`` while no shape record or count read from the wire may
  claim more coordinates than the model has (``codecs.flat.coordinate_limit``: nothing is
  allocated for a size the sender chose); any exception a decoder raises is a rejection;
* the delta has exactly the model's entries and shapes, a floating dtype, and is finite after
  the cast to the model's dtype (a float64 1e300 is inf in float32);
* ``aux`` has exactly the entries of ``algorithm.aux_spec(params)``, with their shapes and
  dtypes, finite, each value within its declared range.

Anything else raises ``ValueError`` naming the entry and what is wrong with it.
"""
from __future__ import annotations

import math

import torch

from atoll import tree as T
from atoll.codecs import flat
from atoll.transport import wire


def decode_update(algorithm, message: bytes, params) -> tuple[dict, dict]:
    """Decode and validate one client's message (see the module docstring); ValueError if bad."""
    parts = _parts(algorithm, message, params)
    delta = check_delta(parts["delta"], params)
    dtype = next(iter(params.values())).dtype
    return delta, check_aux(parts["aux"], algorithm.aux_spec(params), dtype, algorithm.name)


def _parts(algorithm, message: bytes, params) -> dict:
    try:
        parts = T.split(wire.loads(message))
        unexpected = sorted(set(parts) - {"delta", "aux"})
        if unexpected:
            raise ValueError(f"update has unexpected parts {unexpected[:3]} (only delta/ and aux/)")
        with flat.coordinate_limit(sum(p.numel() for p in params.values())):
            delta = algorithm.uplink.decode(parts.get("delta", {}))
        aux = algorithm.aux_codec.decode(parts.get("aux", {}))
    except ValueError:
        raise
    except Exception as exc:  # a decoder fed hostile bytes: a rejection, never a crash
        raise ValueError(f"update does not decode ({type(exc).__name__}: {exc})") from None
    return {"delta": delta, "aux": aux}


def check_delta(delta: dict, params) -> dict:
    """``delta`` cast to the model's dtypes, if it has the model's entries and shapes, a floating
    dtype and finite values."""
    if set(delta) != set(params):
        raise ValueError(f"update has entries {sorted(delta)[:5]}, expected {sorted(params)[:5]}")
    out = {}
    for k, v in delta.items():
        if v.shape != params[k].shape:
            raise ValueError(f"update entry {k!r} has shape {tuple(v.shape)}, "
                             f"expected {tuple(params[k].shape)}")
        if not v.is_floating_point():
            raise ValueError(f"update entry {k!r} has dtype {v.dtype}, expected a floating dtype")
        out[k] = v.to(params[k].dtype)
        if not bool(torch.isfinite(out[k]).all()):
            raise ValueError(f"update entry {k!r} is not finite (NaN or inf)")
    return out


def check_aux(aux: dict, spec: dict, dtype: torch.dtype, who: str = "the algorithm") -> dict:
    """``aux`` checked against ``spec`` (``Algorithm.aux_spec``): entries, shapes, dtypes,
    finiteness, ranges. Entries of dtype ``None`` are cast to ``dtype``."""
    if set(aux) != set(spec):
        raise ValueError(f"aux has entries {sorted(aux)[:5]}, {who} expects {sorted(spec)[:5]}")
    out = {}
    for k, (shape, want, low, high) in spec.items():
        v = aux[k]
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"aux entry {k!r} has shape {tuple(v.shape)}, expected {tuple(shape)}")
        if want is None and not v.is_floating_point() or want is not None and v.dtype != want:
            raise ValueError(f"aux entry {k!r} has dtype {v.dtype}, expected {want or 'a floating dtype'}")
        v = v.to(dtype) if want is None else v
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"aux entry {k!r} is not finite (NaN or inf)")
        if v.numel() and low > -math.inf and float(v.min()) < low:
            raise ValueError(f"aux entry {k!r} has a value {float(v.min()):.6g} below {low:g}")
        if v.numel() and high < math.inf and float(v.max()) > high:
            raise ValueError(f"aux entry {k!r} has a value {float(v.max()):.6g} above {high:g}")
        out[k] = v
    return out
