"""Differential privacy: events, the accountant, budget arithmetic, DP-SGD, the GIH mechanism.

See ``docs/privacy.md``. Codecs that cause privacy events live in ``atoll.codecs`` (``clip``,
``noise``, ``intrinsic``); each declares its event, which the accountant composes per round.

The names below are imported on first use: the accountant pulls in dp-accounting and SciPy
(~3 s), which a command or run without privacy (``atoll run``, ``atoll server``) must not pay.
"""
import importlib

KINDS = ("pld", "rdp", "rdp_classic")  # the accountants (``privacy.accountant``)

_WHERE = {"Accountant": "accountant", "classical_epsilon": "accountant",
          "epsilon": "calibrate", "noise_for_epsilon": "calibrate", "privacy_table": "calibrate",
          "steps_for_budget": "calibrate", "fixed_size_gaussian": "events", "gaussian": "events",
          "intrinsic_quantization": "events", "laplace": "events", "poisson_gaussian": "events",
          "repeated": "events"}
__all__ = ["KINDS", *_WHERE]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'atoll.privacy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"atoll.privacy.{_WHERE[name]}"), name)
