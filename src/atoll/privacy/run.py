"""Privacy of a training run: what it declares per round, and the budget that stops it.

A :class:`PrivacySpec` holds a run's privacy events per round and its budget (built from the
``[privacy]`` section by ``atoll.privacy_config.configure``). ``simulate`` asks the spec for a
:class:`Driver`, which checks every round's events against ``target_epsilon`` *before* the round
runs, charges them after it, and keeps the accountant in ``state.extra[STATE_KEY]`` (so it is in
every checkpoint and a resumed run keeps its spent budget).

Every round is charged in full, whichever clients took part (no amplification by client
sampling is claimed except in ``dp_fedavg``, whose unit is the client).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from atoll.privacy.accountant import Accountant
from atoll.types import ServerState

STATE_KEY = "privacy_accountant"  # where the accountant's state lives in ServerState.extra
UNITS = {"dp_sgd": "record", "intrinsic": "record", "dp_fedavg": "client",
         "local": "client (local DP: any two inputs of one client)",
         "distributed": "client (against a server that sees only the noisy secure sum of at "
                        "least the planned number of clients, each adding its share of the noise)"}


@dataclass(frozen=True)
class PrivacySpec:
    """What a private run declares: its events per round and its budget."""

    mode: str
    events: tuple  # ((DpEvent, count), ...) charged for every round
    accountant: str = "pld"
    neighboring: str = "add_remove"
    delta: float = 1e-5
    target_epsilon: float | None = None
    details: dict = field(default_factory=dict)
    # the events of the client's own stages (no server noise): what a deployed client's ledger
    # charges, since only they protect it from the server
    client_events: tuple = ()

    def driver(self, state: ServerState | None = None) -> Driver:
        return Driver(self, state)


class Driver:
    """Charges a run's rounds to its accountant; stops before a round that would exceed the
    target. The accountant is rebuilt from ``state.extra[STATE_KEY]`` when resuming."""

    def __init__(self, spec: PrivacySpec, state: ServerState | None = None):
        self.spec = spec
        saved = state.extra.get(STATE_KEY) if state is not None else None
        self.acc = (Accountant.from_state(saved) if saved is not None
                    else Accountant(spec.accountant, spec.neighboring))
        self.epsilon = self.acc.epsilon(spec.delta) if self.acc.events else 0.0
        self.stopped: str | None = None
        self._next = None

    def before_round(self, r: int, what: str = "round") -> str | None:
        """None to go on; else why ``what`` ``r`` (a round; for the asynchronous scheduler a
        client's ``r``-th participation) must not run (also kept in ``stopped``)."""
        self._next = self.acc.epsilon_after(list(self.spec.events), self.spec.delta)
        target = self.spec.target_epsilon
        if target is not None and self._next > target:
            self.stopped = (f"privacy budget: {what} {r} would raise epsilon from "
                            f"{self.epsilon:.4g} to {self._next:.4g} > target_epsilon {target:g} "
                            f"(delta {self.spec.delta:g}); stopped after {what} {r - 1}")
        return self.stopped

    def charge(self) -> None:
        """Charge one round's events (after ``before_round`` allowed them)."""
        for event, count in self.spec.events:
            self.acc.step(event, count)
        self.epsilon = self._next

    def after_round(self, state: ServerState, charge: bool = True) -> tuple[ServerState, dict]:
        """Charge the round (unless ``charge`` is False: the scheduler charged already); the
        new state (accountant inside) and the metrics to log."""
        if charge:
            self.charge()
        state = ServerState(state.params, state.opt_state, state.round,
                            {**state.extra, STATE_KEY: self.acc.state()})
        line = {"epsilon": self.epsilon}
        clip = state.extra.get("broadcast", {}).get("dp", {}).get("clip")
        if clip is not None and self.spec.details.get("adaptive"):
            line["clip"] = float(clip[0])
        return state, line

    def summary(self) -> dict:
        """Run metadata for ``final.json``: how each epsilon was obtained."""
        return {"mode": self.spec.mode, "unit": UNITS[self.spec.mode], "epsilon": self.epsilon,
                "delta": self.spec.delta, "target_epsilon": self.spec.target_epsilon,
                "accountant": self.acc.kind, "neighboring": self.acc.neighboring,
                "conversion": self.acc.describe(), "stopped": self.stopped,
                "events_per_round": [[repr(e), c] for e, c in self.spec.events],
                **self.spec.details}


# ----------------------------------------------------------------------------- configure
