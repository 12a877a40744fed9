"""What an asynchronous run is (``[async]``): ``AsyncPlan`` and its staleness weight ``s(tau)``,
and the privacy modes whose accounting asynchronous training would break."""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("fedasync", "fedbuff")
WEIGHTINGS = ("uniform", "aggregator")
STALENESS = ("constant", "polynomial", "hinge")


@dataclass(frozen=True)
class AsyncPlan:
    mode: str = "fedbuff"
    concurrency: int = 10
    buffer: int = 10            # FedBuff's K (FedAsync steps on every arrival)
    alpha: float = 0.6          # FedAsync's mixing weight
    staleness: str = "polynomial"
    a: float = 0.5
    b: float = 4.0
    max_staleness: int | None = None
    weighting: str = "uniform"  # FedBuff: 1/K per buffered update (the paper) or "aggregator"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"async.mode must be one of {MODES}, got {self.mode!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"async.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.staleness not in STALENESS:
            raise ValueError(f"async.staleness must be one of {STALENESS}, got {self.staleness!r}")
        if self.concurrency < 1 or self.buffer < 1:
            raise ValueError(f"async.concurrency and async.buffer must be >= 1, got "
                             f"{self.concurrency}, {self.buffer}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"async.alpha must be in (0, 1], got {self.alpha}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"async.a and async.b must be >= 0, got {self.a}, {self.b}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"async.max_staleness must be >= 0, got {self.max_staleness}")

    def weight(self, tau: int) -> float:
        if self.staleness == "polynomial":
            return (1.0 + tau) ** -self.a
        if self.staleness == "hinge":
            return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)
        return 1.0



def check_privacy(spec) -> None:
    """Refuse privacy modes whose accounting asynchronous training would break."""
    if spec is not None and spec.mode == "dp_fedavg":
        raise ValueError("privacy.mode = \"dp_fedavg\" cannot run asynchronously: its epsilon "
                         "amplifies by Poisson-sampled cohorts, and FedBuff's buffers are not "
                         "Poisson samples (a client can even appear in one buffer twice); use "
                         "mode dp_sgd, local or intrinsic, or synchronous rounds")
