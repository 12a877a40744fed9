"""Asynchronous training on the simulated clock: FedAsync and FedBuff.

An event-driven driver. Up to ``concurrency`` clients train at once; whenever slots are free
(after all events of the current instant), a *wave* fills them with idle, online clients in
the order of the seeded permutation ``randperm(N)`` of ``rng.key(seed, wave, SERVER,
"sample")`` (the synchronous sampler's draw). A client's job has two events: *upload* after its
download and ``K_i`` steps, *arrive* after its upload of its real message bytes
(``atoll.devices``; without devices every duration is zero and events keep dispatch order).

Clients dispatched on the same model version share one broadcast message and are trained
together, lazily, when the first of them uploads (one ``runtime.train`` call on the vectorised
runtime; the loop runtime's client path otherwise); the group id is the ``round`` of their
keys. The server half is the Algorithm's ``server_round``, applied in arrival order:

* ``fedbuff`` (Nguyen et al. 2022): arriving deltas, scaled by ``s(staleness)``, are buffered;
  every ``buffer`` arrivals ``K`` the server averages them, each with weight ``1/K`` as in the
  paper (``weighting = "uniform"``), or with the aggregator's weights (``"aggregator"``:
  training-set sizes by default), and steps;
* ``fedasync`` (Xie et al. 2019): every arrival is a server step mixing the client's model,
  ``x <- x + alpha * s(staleness) * (x_client - x)``, with ``x_client`` = the model it
  started from plus its delta.

Privacy (``plan.privacy``). Record-level modes (``dp_sgd``, ``intrinsic``) and ``local`` protect
each client's data by the noise of each of its own releases, so a run's epsilon is that of the
client that has taken part most often: a participation is charged to the accountant when some
client is dispatched for the ``n``-th time and no client had been dispatched ``n`` times before
(the synchronous driver charges every round, which bounds the same quantity). Before such a
dispatch the budget is checked; if it would be exceeded nobody else is dispatched, the clients in
flight finish, and the run stops cleanly with the reason (``final.json["privacy"]["stopped"]``).
``dp_fedavg`` is refused: its accounting amplifies by Poisson-sampled cohorts, and FedBuff's
buffers are not Poisson samples (a client can even appear in one buffer twice).

Staleness = server versions applied since the client's dispatch; ``s`` is ``constant`` (1),
``polynomial`` ``(1 + tau)^-a`` or ``hinge`` (1 up to ``b``, then ``1 / (a (tau - b) + 1)``).
Updates staler than ``max_staleness`` are dropped and counted (``stale_dropped``). One line of
``metrics.jsonl`` per server step (``round`` = model version), with ``sim_time`` when devices
are simulated. With zero delays, ``concurrency = buffer = C`` and constant staleness weights,
FedBuff equals synchronous FedAvg with ``C`` clients per round, uniformly weighted (or weighted
like the aggregator with ``weighting = "aggregator"``; ``tests/hetero``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from atoll import rundir
from atoll.asynchronous.driver import Driver
from atoll.asynchronous.plan import AsyncPlan, check_privacy  # noqa: F401 (re-exported)
from atoll.client import buffer_names, model_loss, params_of
from atoll.evaluate import FederatedEval
from atoll.runlog import Progress as _Progress
from atoll.runlog import Result
from atoll.runlog import evaluate_and_log as _evaluate_and_log
from atoll.runlog import finish as _finish
from atoll.runlog import open_logs as _open_logs
from atoll.runlog import round_line
from atoll.runtime import make_runtime
from atoll.runtime.base import RoundStats
from atoll.runtime.vmap import VmapRuntime

log = logging.getLogger("atoll")


def simulate_async(algorithm, model, data, plan, *, run_dir=None, runtime=None, resume=False,
                   overwrite=False, progress=False, config_text=None, plots=True):
    """``simulation.simulate`` for ``plan.asynchronous``: same run folder, one line per server step."""
    if resume:
        raise ValueError("asynchronous runs cannot be resumed (the event queue is not "
                         "checkpointed); start a new run")
    runtime = runtime or make_runtime()
    if isinstance(runtime, VmapRuntime):
        runtime.start()
    run_dir = Path(run_dir) if run_dir is not None else None
    fed_eval = FederatedEval(data.clients) if plan.federated_eval else None
    state, metrics = algorithm.init(params_of(model), buffers=buffer_names(model)), []
    if run_dir is not None:
        rundir.prepare(run_dir, overwrite=overwrite)
        _open_logs(run_dir, 0, config_text)
    driver = Driver(algorithm, algorithm.client(model_loss(model)), data, plan, runtime)
    start = time.perf_counter()
    with _Progress(progress, plan.rounds, 0) as bar:
        for state, w in driver.run(state):
            r = state.round
            stats = RoundStats(w.dispatched, len(w.buffer), w.bytes_up, w.bytes_down,
                               sum(b[4] * b[5] for b in w.buffer), sum(b[5] for b in w.buffer),
                               w.stragglers_dropped, w.failures)
            stale = [b[6] for b in w.buffer]
            more = {"staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale),
                    "stale_dropped": w.stale_dropped}
            if plan.devices is not None:
                more["sim_time"] = driver.t
            if driver.privacy is not None:
                state, privacy_line = driver.privacy.after_round(state, charge=False)
                more.update(privacy_line, participations_max=driver.charged)
            line = round_line(r, stats, metrics, **more)
            _evaluate_and_log(line, plan, model, state, data, fed_eval, metrics, run_dir, start)
            bar.update(line)
            if r >= plan.rounds:
                break
    privacy = driver.privacy
    if privacy is not None and privacy.stopped:
        log.warning(privacy.stopped)
    final = _finish(model, state, data, fed_eval, run_dir, plots,
                    {"privacy": privacy.summary()} if privacy is not None else {})
    return Result(state, metrics, final, run_dir)
