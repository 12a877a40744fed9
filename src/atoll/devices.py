"""Heterogeneous devices and the simulated clock.

A :class:`Devices` gives every client a compute speed (local steps per second), a link
bandwidth up and down (bytes per second) and an availability pattern; it turns one client's
work into simulated seconds: ``download bytes / down + K_i / speed + upload bytes / up``. A
synchronous round lasts as long as its slowest client (:meth:`Devices.round_time`); the
asynchronous driver (``atoll.asynchronous``) orders events by the same per-client times.

Profiles (``profile``), each seeded from ``rng.key(seed, 0, SERVER, "devices")``:

* ``uniform``: each quantity ``q * U[1 - spread, 1 + spread]`` (``0 <= spread < 1``);
* ``lognormal``: ``q * exp(spread * N(0, 1))`` (``q`` is the median);
* ``extreme``: every client at ``q`` except ``slow`` clients (chosen by a seeded permutation)
  whose speed and bandwidths are divided by ``slowdown``: one slow device among fast ones;
* ``csv``: a file with columns ``client, speed, up, down`` and optionally ``steps`` (a fixed
  ``K_i``); clients missing from the file get the medians.

Availability: ``always``; ``random``: each client alternates on and off periods with
exponential lengths of means ``on_s`` and ``off_s`` (starting on with probability
``on_s / (on_s + off_s)``, its own seeded stream); ``trace``: a CSV ``client, start, end`` of
online intervals in simulated seconds (clients not in the trace are always online).

Local step counts :class:`StepSchedule` (the ``LocalWork.schedule`` hook, so every runtime
draws the same ``K_i``): ``fixed`` per client (drawn once, or the CSV's ``steps``), ``normal``:
``K_i = max(1, round(|N(mean, std^2)|))`` redrawn every round from
``rng.key(seed, round, client, "steps")``, or ``deadline``: as many steps as the device
finishes in ``deadline`` seconds after its download and upload of ``message_bytes`` each.
"""
from __future__ import annotations

import bisect
import builtins
import math
from dataclasses import dataclass, field

import torch

from atoll import rng
from atoll.devices_csv import read_profile, read_trace

PROFILES = ("uniform", "lognormal", "extreme", "csv")
AVAILABILITY = ("always", "random", "trace")
STEP_MODES = ("fixed", "normal", "deadline")


@dataclass(frozen=True)
class StepSchedule:
    """``schedule(cid, round, seed, n) -> K_i``; picklable (it travels to Ray workers)."""

    mode: str = "normal"
    mean: float = 50.0
    std: float = 30.0
    fixed: tuple[int, ...] = ()
    deadline: float | None = None
    seconds_per_step: tuple[float, ...] = ()
    comm_s: tuple[float, ...] = ()
    max_steps: int | None = None

    def __post_init__(self):
        if self.mode not in STEP_MODES:
            raise ValueError(f"devices.steps must be one of {STEP_MODES}, got {self.mode!r}")
        if self.mode == "deadline" and (self.deadline is None or self.deadline <= 0):
            raise ValueError(f"devices.deadline_s must be > 0 for steps = \"deadline\", got {self.deadline}")
        if self.mean <= 0 or self.std < 0:
            raise ValueError(f"devices.steps_mean must be > 0 and devices.steps_std >= 0, got "
                             f"{self.mean}, {self.std}")

    def __call__(self, cid: int, round: int, seed: int, n: int) -> int:  # noqa: A002
        if self.mode == "fixed":
            k = self.fixed[cid]
        elif self.mode == "normal":
            z = torch.randn(1, generator=rng.generator(rng.key(seed, round, cid, "steps")),
                            dtype=torch.float64).item()
            k = builtins.round(abs(self.mean + self.std * z))
        else:
            k = math.floor((self.deadline - self.comm_s[cid]) / self.seconds_per_step[cid])
        k = max(1, int(k))
        return min(k, self.max_steps) if self.max_steps is not None else k


@dataclass(frozen=True)
class Availability:
    """When each client is online. ``kind``: always, random (on/off), trace (intervals)."""

    kind: str = "always"
    on_s: float = 1.0
    off_s: float = 1.0
    seed: int = 0
    trace: dict = field(default_factory=dict)   # cid -> sorted tuple of (start, end)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in AVAILABILITY:
            raise ValueError(f"devices.availability must be one of {AVAILABILITY}, got {self.kind!r}")
        if self.kind == "random" and (self.on_s <= 0 or self.off_s <= 0):
            raise ValueError(f"devices.on_s and devices.off_s must be > 0, got {self.on_s}, {self.off_s}")

    def intervals(self, cid: int, until: float) -> list[tuple[float, float]]:
        """Client ``cid``'s online intervals starting before ``until`` (random: generated lazily
        from its own stream, always the same)."""
        if self.kind == "trace":
            return list(self.trace.get(cid, ((0.0, math.inf),)))
        if self.kind == "always":
            return [(0.0, math.inf)]
        gen, spans, t, on = self._cache.get(cid, (None, [], 0.0, None))
        if gen is None:
            gen = rng.generator(rng.key(self.seed, 0, cid, "availability"))
            on = torch.rand(1, generator=gen, dtype=torch.float64).item() < self.on_s / (self.on_s + self.off_s)
        while t <= until:
            u = torch.rand(1, generator=gen, dtype=torch.float64).item()
            length = -math.log1p(-u) * (self.on_s if on else self.off_s)
            if on:
                spans.append((t, t + length))
            t, on = t + length, not on
        self._cache[cid] = (gen, spans, t, on)
        return spans

    def next_online(self, cid: int, t: float) -> float:
        """The first time ``>= t`` at which ``cid`` is online (``t`` itself if it is)."""
        horizon = t + 1.0
        while True:
            spans = self.intervals(cid, horizon)
            i = bisect.bisect_right([s for s, _ in spans], t) - 1
            if i >= 0 and spans[i][0] <= t < spans[i][1]:
                return t
            later = [s for s, _ in spans if s > t]
            if later:
                return later[0]
            if self.kind != "random":
                return math.inf
            horizon = 2 * horizon + 1.0

    def online(self, cid: int, t: float) -> bool:
        return self.next_online(cid, t) == t


@dataclass(frozen=True)
class Devices:
    speed: torch.Tensor          # (N,) local steps per second
    up: torch.Tensor             # (N,) bytes per second, client -> server
    down: torch.Tensor           # (N,) bytes per second, server -> client
    availability: Availability = field(default_factory=Availability)
    fixed_steps: tuple[int, ...] = ()  # from a CSV's "steps" column

    def client_time(self, cid: int, steps: int, down_bytes: int, up_bytes: int) -> float:
        """Simulated seconds of one client's round: download, ``steps`` local steps, upload."""
        return (down_bytes / float(self.down[cid]) + steps / float(self.speed[cid])
                + up_bytes / float(self.up[cid]))

    def round_time(self, cohort: list[int], steps: list[int], down_bytes: int,
                   up_bytes: dict[int, int]) -> float:
        """A synchronous round: its slowest client (a client that sent nothing counts its
        download and compute)."""
        return max((self.client_time(c, k, down_bytes, up_bytes.get(c, 0))
                    for c, k in zip(cohort, steps)), default=0.0)


def make_devices(num_clients: int, seed: int, profile: str = "uniform", speed: float = 10.0,
                 up: float = 1e6, down: float = 1e7, spread: float = 0.5, slowdown: float = 100.0,
                 slow: int = 1, csv_path: str | None = None, availability: str = "always",
                 on_s: float = 60.0, off_s: float = 60.0, trace_path: str | None = None) -> Devices:
    """A seeded device population of ``num_clients`` (see the module docstring)."""
    if profile not in PROFILES:
        raise ValueError(f"devices.profile must be one of {PROFILES}, got {profile!r}")
    for name, v in (("speed", speed), ("up", up), ("down", down), ("slowdown", slowdown)):
        if not v > 0:
            raise ValueError(f"devices.{name} must be > 0, got {v}")
    base = torch.tensor([speed, up, down], dtype=torch.float64).expand(num_clients, 3).clone()
    g = rng.generator(rng.key(seed, 0, rng.SERVER, "devices"))
    fixed: tuple[int, ...] = ()
    if profile == "uniform":
        if not 0 <= spread < 1:
            raise ValueError(f"devices.spread must be in [0, 1) for the uniform profile, got {spread}")
        base *= 1 + spread * (2 * torch.rand(num_clients, 3, generator=g, dtype=torch.float64) - 1)
    elif profile == "lognormal":
        if spread < 0:
            raise ValueError(f"devices.spread must be >= 0, got {spread}")
        base *= torch.exp(spread * torch.randn(num_clients, 3, generator=g, dtype=torch.float64))
    elif profile == "extreme":
        if not 0 <= slow <= num_clients:
            raise ValueError(f"devices.slow must be in [0, {num_clients}], got {slow}")
        base[torch.randperm(num_clients, generator=g)[:slow]] /= slowdown
    else:
        base, fixed = read_profile(csv_path, num_clients, base)
    return Devices(base[:, 0].clone(), base[:, 1].clone(), base[:, 2].clone(),
                   _availability(availability, on_s, off_s, seed, trace_path, num_clients), fixed)


def _availability(kind, on_s, off_s, seed, trace_path, num_clients) -> Availability:
    if kind != "trace":
        return Availability(kind, on_s, off_s, seed)
    return Availability("trace", seed=seed, trace=read_trace(trace_path, num_clients))


def make_schedule(devices: Devices | None, num_clients: int, seed: int, mode: str,
                  mean: float = 50.0, std: float = 30.0, deadline: float | None = None,
                  message_bytes: int = 0, max_steps: int | None = None) -> StepSchedule:
    """The ``LocalWork.schedule`` for ``mode`` (fixed / normal / deadline)."""
    fixed, per_step, comm = (), (), ()
    if mode == "fixed":
        if devices is not None and devices.fixed_steps:
            fixed = devices.fixed_steps
        else:
            draw = StepSchedule("normal", mean, std)
            fixed = tuple(draw(c, 0, seed, 0) for c in range(num_clients))
    elif mode == "deadline":
        if devices is None:
            raise ValueError("devices.steps = \"deadline\" needs a device profile (devices.profile)")
        per_step = tuple((1.0 / devices.speed).tolist())
        comm = tuple((message_bytes / devices.down + message_bytes / devices.up).tolist())
    return StepSchedule(mode, mean, std, fixed, deadline, per_step, comm, max_steps)


class Clock:
    """The simulated wall clock of synchronous rounds.

    ``start_round`` drops sampled clients that are offline when the round starts (they sit it
    out; counted as ``clients_offline``); ``end_round`` advances the clock by the round's
    slowest participant (download of the real broadcast bytes, its ``K_i`` steps, upload of its
    real message bytes), or, if every sampled client was offline, to when the first of them
    comes online. ``K_i`` comes from ``runtime.base.active_steps``: the steps the runtime ran.
    """

    def __init__(self, devices: Devices, work, seed: int, data, start: float = 0.0):
        self.devices, self.work, self.seed, self.data = devices, work, seed, data
        self.t = float(start)
        self._offline: list[int] = []

    def start_round(self, cohort: list[int]) -> list[int]:
        avail = self.devices.availability
        online = [c for c in cohort if avail.online(c, self.t)]
        self._offline = [c for c in cohort if c not in set(online)]
        return online

    def end_round(self, cohort: list[int], stats, r: int) -> dict:
        from atoll.runtime.base import active_steps

        if cohort:
            steps = [active_steps(c, r, self.seed, self.work, self.data.clients[c].n) for c in cohort]
            down = stats.bytes_down // max(stats.sampled, 1)
            self.t += self.devices.round_time(cohort, steps, down, stats.up_bytes)
        elif self._offline:
            nxt = min(self.devices.availability.next_online(c, self.t) for c in self._offline)
            if math.isinf(nxt):
                raise ValueError("devices: every sampled client is offline for good (check the trace)")
            self.t = nxt
        line = {"sim_time": self.t}
        if self._offline:
            line["clients_offline"] = len(self._offline)
        return line
