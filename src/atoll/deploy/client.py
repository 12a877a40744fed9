"""``Client``: a data holder's side of a deployment (Python API of ``atoll client``).

    from atoll.deploy import Client
    Client("coordinator.example.org:7070", "my_data.npz", ca="ca.pem",
           cert="alice.pem", key="alice.key", state_path="alice.state.pt").run()

The client dials out (no inbound port), joins, and receives the run's config from the server;
it rebuilds the same algorithm and model from it and then loops: pull a task, train on its own
data with exactly the code of the reference runtime (``runtime.round.client_round``: same batches,
same keys ``rng.key(seed, round, client_id, ...)``, so results equal the simulation's), send the
encoded update, never the data. Exception: where the update carries privacy noise (a DP event
on the update or the uplink), every answer draws a fresh secret from the OS CSPRNG
(``secrets``) that keys its noise and Poisson sample (``rng.private_key``) and is never sent,
and the header leaves out the loss and the realised sample count: the server cannot regenerate
the noise, and a private deployed run is not reproducible (docs/privacy.md). Connection
failures are retried with exponential back-off (with jitter) and the client rejoins by itself
when a restarted server comes back.

Client state (optimizer, codec and correction state that an algorithm keeps across rounds) lives
on the client machine, in ``state_path``: after an accepted update it holds the state before and
after that round, so a round the server has to redo (it was restarted before finishing it)
starts again from the right state. A rejected or late update leaves the state as it was.

With a per-client downlink (``comm.downlink = "client"`` or ``"initial"``, the tracker of US 2025/0265475 A1)
the client also keeps its copy of the model between rounds (in ``state_path`` too): it tells
the server which model it holds (round and hash), applies the sparse messages it receives after
checking them against the model, and trains from the result. Without a copy (or when its hash is
not one the server knows) it receives the dense model. A payload that fails the checks is
refused (logged, counted in ``refused``, no answer) and the copy dropped, so the next task is dense.

Data: an ``.npz`` file with ``x`` (N, n_features) float features, already preprocessed as the
model expects, and ``y`` (N,) integer class ids in ``[0, n_classes)``.
"""
from __future__ import annotations

import io
import logging
import random
import secrets
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from atoll import checkpoint, rng
from atoll import config as C
from atoll import tree as T
from atoll.client import buffer_names, model_loss, params_of
from atoll.data.datasets import read_npz
from atoll.data.federated import ClientData
from atoll.deploy import downlink
from atoll.deploy import policy as P
from atoll.deploy.he_client import HeParty, is_he
from atoll.deploy.he_rounds import run_id as he_run_id
from atoll.deploy.secure_client import SecureParty, identity
from atoll.runtime.round import client_round
from atoll.transport import wire
from atoll.transport.grpc.client import Connection, TransportError

log = logging.getLogger("atoll.deploy")


class Client:
    private = False  # whether the update carries privacy noise (set from the config by _setup)
    secure = None    # [secure]: this client's side of the secure sum (deploy.secure_client)

    def __init__(self, server: str, data, *, ca=None, cert=None, key=None, token=None,
                 insecure: bool = False, state_path=None, policy=None,
                 poll_s: float = 10.0, backoff: tuple[float, float] = (0.5, 30.0),
                 give_up_s: float | None = None):
        self.server, self.data = server, data
        self.creds = credentials(ca=ca, cert=cert, key=key, token=token, insecure=insecure)
        self.state_path = Path(state_path) if state_path else None
        self.poll_s = poll_s
        # what this client accepts from the server (atoll.deploy.policy; docs/deployment.md)
        self.policy = P.load(policy)
        ledger = self.state_path.with_name(self.state_path.name + ".ledger.json") if state_path else None
        self.guard = P.Guard(self.policy, ledger)
        self.backoff, self.give_up_s = backoff, give_up_s
        self.run_id = None
        self.counts = {"answered": 0, "accepted": 0, "rejected": 0, "reconnects": 0, "refused": 0}
        self.tracked = False  # per-client downlink: self.held is the model this client holds
        self.held: dict | None = None
        self.first_task_s: float | None = None  # seconds from the first connection to the first task

    def run(self) -> dict:
        """Train until the server says the run is done; returns counts of what happened."""
        failures, t0, last_ok = 0, time.monotonic(), time.monotonic()
        while True:
            conn = Connection(self.server, max_task_bytes=self.policy.max_task_bytes, **self.creds)
            try:
                self._setup(conn.join())
                if self.tracked:  # a larger task is refused before it is received
                    conn.max_task = min(conn.max_task, downlink.payload_limit(self.model0, self.rest))
                failures, last_ok = 0, time.monotonic()
                while True:
                    task = conn.get_task(self.poll_s, self._claim())
                    last_ok = time.monotonic()
                    if task.kind == "DONE":
                        return self.counts
                    if task.kind == "SYNC":
                        self._sync(task)
                    if task.kind == "TASK":
                        self.first_task_s = self.first_task_s or time.monotonic() - t0
                        self._answer(conn, task)
                    if task.kind == "STAGE" and self.secure is not None:
                        self._stage(conn, task)
            except TransportError as exc:
                if not exc.retryable:
                    raise
                if self.give_up_s is not None and time.monotonic() - last_ok > self.give_up_s:
                    raise
                failures += 1
                self.counts["reconnects"] += 1
                # jitter spreads reconnecting clients out; it is timing only, never results
                pause = random.uniform(0, min(self.backoff[1], self.backoff[0] * 2 ** failures))
                log.warning("connection to %s failed (%s); retrying in %.1f s", self.server, exc, pause)
                time.sleep(pause)
            finally:
                conn.close()

    def _setup(self, info: dict) -> None:
        """Build the algorithm, model and local work from the config the server sent."""
        run_id = he_run_id(info["config_toml"])
        if run_id == self.run_id:
            return
        cfg = self.guard.config(info, run_id)  # sizes, model allow-list, paths: before building
        shape = SimpleNamespace(n_features=info["n_features"], n_classes=info["n_classes"],
                                clients=[None] * info["num_clients"])
        algorithm, model, _, plan = C.build(cfg, data=shape)
        dtype = next(model.parameters()).dtype
        self.cdata = _client_data(self.data, info["n_features"], info["n_classes"], dtype)
        self.guard.built(cfg, plan, self.cdata.n, info["client_id"])
        self.algorithm, self.work, self.seed = algorithm, plan.work, plan.seed
        self.client_update = algorithm.client(model_loss(model))
        self.private = private_noise(algorithm)
        self.cid, self.run_id = info["client_id"], run_id
        self.like = params_of(model)  # the model's entries and shapes (checks its own update)
        sec = self.guard.policy.secure
        self.secure = (None if algorithm.secure is None else
                       HeParty(algorithm.secure, self.cid, info["num_clients"], sec.min_cohort,
                               sec.he_public_key, *identity(algorithm.secure, self.creds),
                               run=run_id) if is_he(algorithm.secure) else
                       SecureParty(algorithm.secure, self.cid, info["num_clients"], sec.min_cohort,
                                   *identity(algorithm.secure, self.creds)))
        self.states = self._load_states()
        if algorithm.tracker is not None:
            self._track(algorithm, model)
        log.info("joined %s as %s (client %d), %d local samples", self.server, info["name"],
                 self.cid, self.cdata.n)

    def _track(self, algorithm, model) -> None:
        """The model template, the broadcast's other entries and the copy this client holds."""
        w0 = params_of(model)
        rest = algorithm.broadcast(algorithm.init(w0, buffers=buffer_names(model)))
        self.tracked, self.model0 = True, {k: v.detach().clone() for k, v in w0.items()}
        self.rest = T.join({k: v for k, v in rest.items() if k != "params"})
        saved = (self.states or {}).pop("held", None)
        tr = algorithm.tracker
        if saved is not None and downlink.spec(saved["params"]) == downlink.spec(self.model0):
            self._hold(int(saved["round"]), saved["params"])
        elif tr.holds_initial or tr.base == "initial":  # built from the run's config and seed
            self._hold(0, self.model0)
        else:
            self._hold(None, None)

    def _hold(self, r: int | None, params) -> None:
        self.held = None if r is None else {"round": r, "params": params,
                                            "hash": downlink.model_hash(params)}

    def _claim(self):
        return None if self.held is None else (self.held["round"], self.held["hash"])

    def _receive(self, task, rest) -> dict | None:
        """Apply a per-client payload to the held copy; None (and no copy) if it is refused."""
        held = None if self.held is None else self.held["params"]
        try:
            params, other = downlink.receive(task.data, held, self.model0, rest)
        except ValueError as exc:
            log.error("round %d: refused the server's downlink payload: %s", task.round, exc)
            self.counts["refused"] += 1
            self._hold(None, None)
            time.sleep(self.backoff[0])  # a server that keeps sending bad payloads is not spun on
            return None
        self._hold(task.round - 1, params)  # the model of the round before the task's
        return {"params": params, **other}

    def _sync(self, task) -> None:
        """An anchor sent to every client: apply it to the held copy."""
        if self._receive(task, None) is not None:
            self._save()

    def _answer(self, conn: Connection, task) -> None:
        r = task.round
        if self.guard.plan is not None:  # set by _setup (a unit test may drive _answer alone)
            self.guard.before_task(r)
        if self.tracked:  # the broadcast rebuilt from the held copy (identity downlink codec)
            received = self._receive(task, self.rest)
            if received is None:
                return
            task = SimpleNamespace(round=r, task_id=task.task_id, data=wire.dumps(T.join(received)))
        s = self.states
        before = None if s is None else (s["before"] if s["round"] == r else s["after"])
        secret = secrets.token_bytes(32) if self.private else None  # never leaves this method
        message, after, metrics, straggler = client_round(
            self.algorithm, self.client_update, task.data, before, self.cdata, self.cid, r,
            self.work, self.seed, secret)
        loss, samples = ((0.0, 0.0) if self.private  # not covered by the DP guarantee: kept here
                         else (float(metrics["loss"]), float(metrics["samples"])))
        if self.secure is not None:  # the update waits here, encoded, for the secure stages
            self.secure.start(self.algorithm, message, self.like, r, self.cdata.n,  # noise: secret
                              rng.private_key(self.seed, r, self.cid, "secure", secret), self.seed)
            message = b""
        accepted, reason = conn.submit(r, task.task_id, message, num_examples=self.cdata.n,
                                       loss=loss, samples=samples, straggler=straggler)
        self.counts["answered"] += 1
        self.counts["accepted" if accepted else "rejected"] += 1
        if accepted:
            self.states = {"run": self.run_id, "round": r, "before": before, "after": after}
        else:
            log.warning("round %d: update not accepted: %s", r, reason)
        if accepted or self.held is not None:
            self._save()

    def _stage(self, conn: Connection, task) -> None:
        """Answer one secure-aggregation stage request (``deploy.secure_client``)."""
        data, seconds = self.secure.answer(task.round, task.stage, task.data)
        accepted, reason = conn.submit(task.round, task.task_id, data, num_examples=self.cdata.n,
                                       loss=0.0, samples=0.0, stage=task.stage, seconds=seconds)
        if not accepted and data:
            log.warning("round %d: secure stage %d answer not accepted: %s", task.round, task.stage, reason)

    def _save(self) -> None:
        """Write the states (and the held model) to ``state_path`` atomically."""
        if self.state_path is None:
            return
        out = dict(self.states or {"run": self.run_id, "round": 0, "before": None, "after": None})
        if self.held is not None:
            out["held"] = {"round": self.held["round"], "params": self.held["params"]}
        buf = io.BytesIO()
        torch.save(out, buf)
        checkpoint.atomic_write(self.state_path, buf.getvalue())

    def _load_states(self):
        if self.state_path is None or not self.state_path.exists():
            return None
        states = checkpoint.load_file(self.state_path, "client state file")
        if states.get("run") != self.run_id:
            log.warning("%s belongs to another run; starting with a fresh client state", self.state_path)
            return None
        return states


def private_noise(algorithm) -> bool:
    """Whether a client's update carries privacy noise that must be secret from the server:
    one of its own stages declares a DP event (``privacy_config.stage_events``: DP-SGD's
    estimator, a local-noise or intrinsic uplink or aux codec, distributed DP's secure noise)."""
    from atoll.privacy_config import stage_events

    return bool(stage_events(algorithm, 1, "add_remove", client_only=True))


def _client_data(data, n_features: int, n_classes: int, dtype) -> ClientData:
    """The client's training set from an ``.npz`` path (``x``, ``y``) or an object with x, y."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"client data file {path} does not exist")
        arrays = read_npz(path)
        x, y = torch.as_tensor(arrays["x"]), torch.as_tensor(arrays["y"])
    else:
        x, y, path = data.x, data.y, "client data"
    if x.ndim != 2 or x.shape[1] != n_features or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"{path}: need x (N, {n_features}) and y (N,) with N > 0 for this run's "
                         f"model; got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if y.is_floating_point() or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"{path}: y must hold integer class ids in [0, {n_classes})")
    x = x.to(dtype)
    return ClientData(x, y.to(torch.int64), x[:0], y[:0].to(torch.int64))


def credentials(*, ca=None, cert=None, key=None, token=None, insecure: bool = False) -> dict:
    """Connection credentials from file paths (or bytes); a token may be given or be a path."""
    return {"ca": _file(ca, "CA certificate"), "cert": _file(cert, "certificate"),
            "key": _file(key, "key"), "token": _token(token), "insecure": insecure}


def _file(v, what: str) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    if not Path(v).is_file():
        raise ValueError(f"{what} file {v} does not exist")
    return Path(v).read_bytes()


def _token(v) -> str | None:
    """A token given as itself or as the path of the file holding it."""
    if v is None:
        return None
    v = v.decode() if isinstance(v, bytes) else str(v)
    return (Path(v).read_text() if Path(v).is_file() else v).strip()
