"""Differential privacy: events, the accountant, budget arithmetic, DP-SGD, the GIH mechanism.

See ``docs/privacy.md``. Codecs that cause privacy events live in ``atoll.codecs`` (``clip``,
``noise``, ``intrinsic``); each declares its event, which the accountant composes per round.
"""
from atoll.privacy.accountant import Accountant, classical_epsilon
from atoll.privacy.calibrate import epsilon, noise_for_epsilon, privacy_table, steps_for_budget
from atoll.privacy.events import (fixed_size_gaussian, gaussian, intrinsic_quantization, laplace,
                                  poisson_gaussian, repeated)

__all__ = ["Accountant", "classical_epsilon", "epsilon", "noise_for_epsilon", "privacy_table",
           "steps_for_budget", "fixed_size_gaussian", "gaussian", "intrinsic_quantization", "laplace",
           "poisson_gaussian", "repeated"]
