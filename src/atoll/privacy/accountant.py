"""``Accountant``: composes the privacy events of a run and answers epsilon(delta).

A thin, checkpointable wrapper over Google's ``dp_accounting``:

* ``kind="pld"``: ``PLDAccountant`` (privacy loss distributions, pessimistic discretisation);
  epsilon is read exactly from the composed PLD. Also composes atoll's ``IrwinHallDpEvent``.
* ``kind="rdp"``: ``RdpAccountant`` with dp-accounting's improved RDP -> (epsilon, delta)
  conversion (Balle et al. 2020, Prop. 12; Canonne et al. 2020).
* ``kind="rdp_classic"``: the same RDP curve with the classical moments-accountant tail bound
  ``epsilon = min_a RDP(a) + log(1/delta) / (a - 1)`` (Abadi et al. 2016; Mironov 2017, Prop. 3),
  on TF-Privacy's legacy orders: reproduces published numbers computed that way.

Sensitivity convention (one for every event and relation): a noise multiplier is noise std /
clip, and one record (or client) contributes a vector of norm at most the clip. Adding or removing
it moves the released sum by one clip; *replacing* it moves the sum by up to two clips. So under
``replace_one`` every Gaussian or Laplace event is accounted with twice the sensitivity:
dp-accounting's PLD already does so for the Gaussian (its ``REPLACE`` adjacency shifts by two
sensitivities); its RDP accountant ignores the relation for ``GaussianDpEvent`` and
``LaplaceDpEvent``, and its PLD refuses Laplace, so ``_RdpAccountant`` / ``_PLDAccountant``
below halve the multiplier (the scale) of those events. Poisson-subsampled events under
``replace_one`` are PLD-only (dp-accounting's RDP has no bound for them).

Invariants: the accountant is pure data, a run-length list of ``(event, count)``; epsilon is
always recomputed from that list by a fresh dp-accounting accountant, so ``from_state(state())``
answers exactly what the original answers (resume reproduces), and ``would_exceed`` checks a
round before it runs.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from dp_accounting import privacy_accountant
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import RdpAccountant

from atoll.privacy import KINDS
from atoll.privacy import events as ev
from atoll.privacy.irwin_hall import round_pld

NeighborRel = privacy_accountant.NeighboringRelation
NEIGHBORING = {"add_remove": NeighborRel.ADD_OR_REMOVE_ONE, "replace_one": NeighborRel.REPLACE_ONE}
# TF-Privacy's orders before 2020 (used by its MNIST tutorial table and compute_dp_sgd_privacy).
LEGACY_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


FINITE_MIN = 1e-9  # a composed PLD with less finite mass is treated as non-private (delta floor ~ 1)


class _PLDAccountant(PLDAccountant):
    """dp-accounting's PLD accountant that also composes ``IrwinHallDpEvent``, and Laplace under
    ``replace_one`` (sensitivity two: ``from_laplace_mechanism(b, sensitivity=2)``)."""

    def _maybe_compose(self, event, count, do_compose):
        if _negligible(event, self._value_discretization_interval):  # see GRID_MAX
            if do_compose:
                self._contains_non_dp_event = True
            return None
        if (isinstance(event, ev.dp_event.LaplaceDpEvent) and event.noise_multiplier > 0
                and self.neighboring_relation is NeighborRel.REPLACE_ONE):
            if do_compose:
                self._pld = self._pld.compose(pld_lib.from_laplace_mechanism(
                    event.noise_multiplier, sensitivity=2,
                    value_discretization_interval=self._value_discretization_interval).self_compose(count))
            return None
        if _cacheable(event):  # same PLD as dp-accounting builds, built once per process
            if do_compose:
                base = _subsampled_gaussian(event.event.noise_multiplier, event.sampling_probability,
                                            self._value_discretization_interval, self.neighboring_relation)
                self._pld = self._pld.compose(base.self_compose(count))
            return None
        if not isinstance(event, ev.IrwinHallDpEvent):
            return super()._maybe_compose(event, count, do_compose)
        if self.neighboring_relation is not NeighborRel.ADD_OR_REMOVE_ONE:
            return self.CompositionErrorDetails(
                invalid_event=event, error_message="IrwinHallDpEvent needs add/remove neighbouring")
        if do_compose:
            pld = round_pld(event.uniforms, event.width, event.sensitivity, event.dimension,
                            event.sampling_probability, self._value_discretization_interval)
            # Where (almost) every outcome has infinite loss, epsilon is infinite at any delta the
            # run could ask (delta floor >= 1 - FINITE_MIN); dp-accounting cannot compose a pmf
            # with no finite mass, so such a run is marked non-private instead.
            if pld is None or _finite(self._pld) * _finite(pld) ** count < FINITE_MIN:
                self._contains_non_dp_event = True
            elif not self._contains_non_dp_event:
                self._pld = self._pld.compose(pld.self_compose(count))
        return None


GRID_MAX = 2e6  # PLD grid points one step may need before its epsilon is printed as infinite


def _negligible(event, disc: float) -> bool:
    """A Gaussian or Laplace step (bare or Poisson-sampled) whose noise is so small that its
    privacy losses span more than ``GRID_MAX`` points of dp-accounting's grid (Gaussian: about
    ``(1 / (2 z^2) + 10 / z) / disc``, epsilon above ~100 per step; Laplace: ``2 / (b disc)``),
    which would need more memory than exists. Calling its epsilon infinite only overstates it."""
    D = ev.dp_event  # noqa: N806
    if isinstance(event, D.PoissonSampledDpEvent):
        event = event.event
    z = getattr(event, "noise_multiplier", 0)
    if isinstance(event, D.GaussianDpEvent) and z > 0:
        return (0.5 / z ** 2 + 10 / z) / disc > GRID_MAX
    if isinstance(event, D.LaplaceDpEvent) and z > 0:
        return 2 / (z * disc) > GRID_MAX
    return False


def _finite(pld) -> float:
    """The finite mass of a PLD (the smaller of its two sides')."""
    return min(1.0 - pld._pmf_remove._infinity_mass, 1.0 - pld._pmf_add._infinity_mass)  # noqa: SLF001


class _RdpAccountant(RdpAccountant):
    """dp-accounting's RDP accountant with atoll's sensitivity convention under ``replace_one``:
    a Gaussian or Laplace leaf (also inside a fixed-size sample) is composed at half its
    multiplier, i.e. at sensitivity two clips. Only leaves are rewritten, once: composite
    events reach their leaves through this same method."""

    def _maybe_compose(self, event, count, do_compose):
        if self._neighboring_relation is NeighborRel.REPLACE_ONE:
            event = _halved(event)
        return super()._maybe_compose(event, count, do_compose)


def _halved(event):
    D = ev.dp_event  # noqa: N806
    if isinstance(event, D.GaussianDpEvent):
        return D.GaussianDpEvent(event.noise_multiplier / 2)
    if isinstance(event, D.LaplaceDpEvent):
        return D.LaplaceDpEvent(event.noise_multiplier / 2)
    if isinstance(event, D.SampledWithoutReplacementDpEvent):  # its inner Gaussian is read directly
        return D.SampledWithoutReplacementDpEvent(event.source_dataset_size, event.sample_size,
                                                  _halved_tree(event.event))
    return event


def _halved_tree(event):
    D = ev.dp_event  # noqa: N806
    if isinstance(event, D.SelfComposedDpEvent):
        return D.SelfComposedDpEvent(_halved_tree(event.event), event.count)
    if isinstance(event, D.ComposedDpEvent):
        return D.ComposedDpEvent([_halved_tree(e) for e in event.events])
    return _halved(event)


def _cacheable(event) -> bool:
    return (isinstance(event, ev.dp_event.PoissonSampledDpEvent)
            and isinstance(event.event, ev.dp_event.GaussianDpEvent)
            and event.sampling_probability > 0 and event.event.noise_multiplier > 0)


@functools.lru_cache(maxsize=64)
def _subsampled_gaussian(z: float, q: float, disc: float, relation):
    """dp-accounting's PLD of one Poisson-subsampled Gaussian (what its PLDAccountant composes
    for ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``), cached: a run asks for it every round."""
    return pld_lib.from_gaussian_mechanism(z, value_discretization_interval=disc, sampling_prob=q,
                                           neighboring_relation=relation)


class Accountant:
    """Composes privacy events; ``epsilon(delta)`` / ``delta(epsilon)`` after all of them.

    ``kind``: ``"pld"`` (default, tightest), ``"rdp"`` or ``"rdp_classic"``;
    ``neighboring``: ``"add_remove"`` (default) or ``"replace_one"``.
    """

    def __init__(self, kind: str = "pld", neighboring: str = "add_remove",
                 discretization: float = 1e-4):
        if kind not in KINDS:
            raise ValueError(f"privacy.accountant must be one of {KINDS}, got {kind!r}")
        if neighboring not in NEIGHBORING:
            raise ValueError(f"neighboring must be one of {sorted(NEIGHBORING)}, got {neighboring!r}")
        self.kind, self.neighboring, self.discretization = kind, neighboring, float(discretization)
        self._ledger: list[tuple[ev.DpEvent, int]] = []
        self._built = None

    # ----------------------------------------------------------------- composing
    def fresh(self):
        """An empty dp-accounting accountant of this kind (also used for calibration)."""
        rel = NEIGHBORING[self.neighboring]
        if self.kind == "pld":
            return _PLDAccountant(rel, value_discretization_interval=self.discretization)
        orders = LEGACY_ORDERS if self.kind == "rdp_classic" else None
        return _RdpAccountant(orders=orders, neighboring_relation=rel)

    def step(self, event: ev.DpEvent, count: int = 1) -> None:
        """Record ``count`` repetitions of ``event`` (e.g. one per round)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self._check(event)
        if self._ledger and self._ledger[-1][0] == event:
            self._ledger[-1] = (event, self._ledger[-1][1] + int(count))
        else:
            self._ledger.append((event, int(count)))
        self._built = None

    @property
    def events(self) -> list[tuple[ev.DpEvent, int]]:
        return list(self._ledger)

    def _check(self, event) -> None:
        acc = self.fresh()
        if not acc.supports(event):
            raise ValueError(f"the {self.kind} accountant with {self.neighboring} neighbouring "
                             f"cannot account for {event!r}; see Accountant.describe()")

    def _build(self, ledger):
        acc = self.fresh()
        for event, count in ledger:
            acc.compose(event, count)
        return acc

    def _acc(self):
        if self._built is None:
            self._built = self._build(self._ledger)
        return self._built

    # ----------------------------------------------------------------- answers
    def epsilon(self, delta: float) -> float:
        """Smallest epsilon such that the run so far is (epsilon, delta)-DP (``inf`` if none)."""
        check_delta(delta)
        if self._built is None:  # nothing composed here yet: the remembered answer if any
            return _ledger_epsilon(self.kind, self.neighboring, self.discretization,
                                   tuple(self._ledger), float(delta))
        return _epsilon(self.kind, self._built, delta)

    def delta(self, epsilon: float) -> float:
        """Smallest delta such that the run so far is (epsilon, delta)-DP."""
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        acc = self._acc()
        if self.kind == "rdp_classic":
            with np.errstate(over="ignore"):
                return float(min(1.0, np.min(np.exp((acc.orders - 1) * (acc.rdp - epsilon)))))
        return float(acc.get_delta(epsilon))

    def would_exceed(self, event: ev.DpEvent, target_epsilon: float, delta: float,
                     count: int = 1) -> bool:
        """Whether running ``event`` (``count`` times) next would push epsilon past the target."""
        return self.epsilon_after([(event, count)], delta) > target_epsilon

    def epsilon_after(self, steps: list[tuple[ev.DpEvent, int]], delta: float) -> float:
        """epsilon if ``steps`` (``(event, count)`` pairs, e.g. one round's) ran next; the
        ledger is unchanged. Equals ``epsilon(delta)`` after ``step``-ping them."""
        check_delta(delta)
        trial = Accountant(self.kind, self.neighboring, self.discretization)
        trial._ledger = list(self._ledger)
        for event, count in steps:
            trial.step(event, count)
        return _ledger_epsilon(self.kind, self.neighboring, self.discretization,
                               tuple(trial._ledger), float(delta))

    def describe(self) -> str:
        rel = {"add_remove": "add/remove one record", "replace_one": "replace one record"}[self.neighboring]
        conv = {
            "pld": f"dp-accounting PLDAccountant (pessimistic PLD, grid {self.discretization:g}); "
                   "epsilon read exactly from the composed PLD",
            "rdp": "dp-accounting RdpAccountant; RDP -> (epsilon, delta) by its improved conversion "
                   "(Balle et al. 2020, Prop. 12)",
            "rdp_classic": "dp-accounting RDP curve on TF-Privacy's legacy orders; classical "
                           "moments-accountant conversion min_a RDP(a) + log(1/delta)/(a-1)",
        }[self.kind]
        return f"{conv}; neighbouring: {rel}; {sum(c for _, c in self._ledger)} events composed"

    # ----------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """Plain, JSON-able data: enough to rebuild an identical accountant."""
        return {"format": 1, "kind": self.kind, "neighboring": self.neighboring,
                "discretization": self.discretization,
                "events": [[ev.to_dict(e), c] for e, c in self._ledger]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Accountant:
        if state.get("format") != 1:
            raise ValueError(f"accountant state: unknown format {state.get('format')!r}")
        acc = cls(state["kind"], state["neighboring"], state["discretization"])
        acc._ledger = [(ev.from_dict(e), int(c)) for e, c in state["events"]]
        return acc


def check_delta(delta: float) -> None:
    """Refuse a delta outside (0, 1): at 0 no Gaussian run has a finite epsilon, at 1 any
    mechanism, however revealing, is "(0, 1)-DP"."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def classical_epsilon(orders, rdp, delta: float) -> float:
    """Moments-accountant conversion ``min_a RDP(a) + log(1/delta)/(a-1)`` (Abadi et al. 2016)."""
    orders, rdp = np.asarray(orders, dtype=np.float64), np.asarray(rdp, dtype=np.float64)
    if delta <= 0:
        return math.inf
    return float(max(0.0, np.min(rdp + math.log(1 / delta) / (orders - 1))))


@functools.lru_cache(maxsize=256)
def _ledger_epsilon(kind, neighboring, discretization, ledger, delta) -> float:
    """epsilon of a whole ledger, remembered: a run asks for the same ledger twice (before a
    round, then after it), and runs with the same events ask for the same ledgers."""
    acc = Accountant(kind, neighboring, discretization)
    return _epsilon(kind, acc._build(list(ledger)), delta)


def _epsilon(kind: str, acc, delta: float) -> float:
    if kind == "rdp_classic":
        return classical_epsilon(acc.orders, acc.rdp, delta)
    return float(acc.get_epsilon(delta))
