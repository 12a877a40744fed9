"""What every runtime shares: the local work plan, per-client batches, round statistics.

A runtime moves payloads and schedules clients; it contains no algorithm maths. All the
randomness of a client's round comes from ``rng.key(seed, round, client, purpose)``, so every
runtime draws the same batches and the same straggler decisions for the same client.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from atoll import rng
from atoll.codecs import Codec, for_round
from atoll.data import batch_indices, gather, num_steps
from atoll.sampling import straggler_steps


@dataclass(frozen=True)
class LocalWork:
    """How much local work a sampled client does.

    ``epochs`` or ``steps`` (exactly one); ``stragglers``: the fraction of sampled clients that
    finish only part of their work (a uniform number of steps in ``[1, S-1]``, as in the FedProx
    paper's experiments); ``drop_stragglers``: drop them from the round (FedAvg's policy in that
    paper) instead of keeping their partial work.
    """

    batch_size: int = 10
    epochs: int | None = 1
    steps: int | None = None
    stragglers: float = 0.0
    drop_stragglers: bool = False
    # Per-client, per-round step counts (heterogeneous devices, ``atoll.devices``): a picklable
    # ``schedule(cid, round, seed, n) -> S`` that replaces epochs/steps when set.
    schedule: Callable[[int, int, int, int], int] | None = None

    def __post_init__(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("local work: give exactly one of client.epochs and client.steps")
        if self.batch_size < 1:
            raise ValueError(f"client.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.stragglers <= 1.0:
            raise ValueError(f"client.stragglers must be in [0, 1], got {self.stragglers}")

    def total_steps(self, n: int) -> int:
        return self.steps if self.steps is not None else num_steps(n, self.batch_size, self.epochs)

    def round_steps(self, cid: int, round: int, seed: int, n: int) -> int:  # noqa: A002
        """``S``: client ``cid``'s local steps in ``round`` (the schedule's, else epochs/steps)."""
        return self.total_steps(n) if self.schedule is None else int(self.schedule(cid, round, seed, n))


@dataclass
class RoundStats:
    sampled: int = 0
    succeeded: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    loss_sum: float = 0.0
    samples: float = 0.0
    stragglers_dropped: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)
    up_bytes: dict[int, int] = field(default_factory=dict)  # per client, for the simulated clock
    extra: dict = field(default_factory=dict)  # more metrics of the round (the secure sum's)

    @property
    def train_loss(self) -> float | None:
        return self.loss_sum / self.samples if self.samples > 0 else None


@dataclass(slots=True)
class Outcome:
    """One client's round as the server sees it (``error``: the client raised)."""

    pos: int
    cid: int
    message: bytes | None
    state: Any
    loss: float
    samples: float
    straggler: bool
    error: str | None = None


class AllClientsFailed(RuntimeError):
    """Every client of a round failed: the run cannot train, so it stops (and says why)."""


def check_round(stats: RoundStats, r: int) -> None:
    """Raise ``AllClientsFailed`` when every sampled client of round ``r`` failed (raised, or
    sent an update that was rejected); a round with no client or with dropped stragglers is not
    a failure."""
    if stats.sampled and not stats.succeeded and len(stats.failures) == stats.sampled:
        raise AllClientsFailed(f"round {r}: all {stats.sampled} sampled clients failed, so the "
                               f"model cannot train; {failure_reasons(stats.failures)}")


def failure_reasons(failures: list[tuple[int, str]]) -> str:
    """The distinct reasons of ``failures`` (at most three), each with its first client."""
    first: dict[str, int] = {}
    for cid, why in failures:
        first.setdefault(why, cid)
    shown = [f"client {cid}: {why}" for why, cid in list(first.items())[:3]]
    more = f" (and {len(first) - 3} other reasons)" if len(first) > 3 else ""
    return "; ".join(shown) + more


def client_work(x: torch.Tensor, y: torch.Tensor, cid: int, round: int, seed: int,  # noqa: A002
                work: LocalWork) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """Batches ``(S, B, ...)``, the step mask ``(S,)`` and whether the client straggles."""
    n = y.shape[0]
    total = work.round_steps(cid, round, seed, n)
    g = rng.generator(rng.key(seed, round, cid, "batches"))
    idx = batch_indices(n, work.batch_size, steps=total, generator=g)
    xb, yb, mask = gather(x, y, idx)
    k, straggler = straggler_steps(cid, round, seed, work, total)
    step_mask = torch.arange(total) < k
    return {"x": xb, "y": yb, "mask": mask}, step_mask, straggler


def draw_work(draw, cdata, cid: int, round: int, seed: int, work: LocalWork,  # noqa: A002
              params, secret: bytes | None = None
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """``client_work``, or the algorithm's own draw where it has one (``Algorithm.draw(x, y,
    cid, round, seed, work, params, secret)``: DP-SGD's Poisson batches with pre-drawn noise,
    ``algorithms.dp``, keyed by ``rng.private_key(..., secret)``), made outside the pure update
    so that it runs under vmap."""
    if draw is None:
        return client_work(cdata.x, cdata.y, cid, round, seed, work)
    return draw(cdata.x, cdata.y, cid, round, seed, work, params, secret)


def stack_drawn(drawn: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack clients' own draws ``(S, B_c, ...)`` to ``(C, S, max B_c, ...)``: the sample axis
    of ``x``, ``y``, ``mask`` and ``poisson_u`` is padded (mask False, zeros); the rest as is."""
    width = max(b["y"].shape[1] for b in drawn)
    out = {}
    for k in drawn[0]:
        rows = [b[k] for b in drawn]
        if k in ("x", "y", "mask", "poisson_u"):
            rows = [torch.cat([t, t.new_zeros((t.shape[0], width - t.shape[1], *t.shape[2:]))], 1)
                    for t in rows]
        out[k] = torch.stack(rows)
    return out


def active_steps(cid: int, round: int, seed: int, work: LocalWork, n: int) -> int:  # noqa: A002
    """The number of steps client ``cid`` (``n`` samples) completes in ``round``."""
    return straggler_steps(cid, round, seed, work, work.round_steps(cid, round, seed, n))[0]


def uplink_codec(algorithm, seed: int, r: int) -> Codec:
    """Round ``r``'s uplink codec: randomness all its clients share (count-sketch hashes) drawn
    from the round's key, the same for every client and runtime."""
    return for_round(algorithm.uplink, rng.key(seed, r, rng.SERVER, "uplink"))
