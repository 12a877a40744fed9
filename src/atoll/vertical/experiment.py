"""A simulated vertical run with a run folder (``atoll run`` on a config with ``[vertical]``).

Every party's table is in this process; the ids are aligned first (PSI, ``atoll.vertical.psi``,
or in the clear), then the label party's ``LabelRun`` trains over a ``Channel`` to which each
feature party's ``FeatureEndpoint`` is attached: the same code as ``atoll vertical serve|connect``,
with the channel in one process instead of gRPC.

The run folder is a horizontal run's (``atoll.rundir``, ``atoll.runlog``): ``config.toml``,
``metrics.jsonl`` (one deterministic line per epoch: training loss, held-out loss, AUC and
accuracy, bytes), ``timings.jsonl``, ``checkpoint.pt`` (after every epoch: every party's model
and optimizer state, the noise generator, the losses so far), ``final.json`` (with every step's
loss) and ``model.pt``. A resume continues from the checkpoint; batches come from the seed and the
noise generator's state is saved, so the losses equal an uninterrupted run's exactly.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import torch

from atoll import checkpoint, rundir, runlog
from atoll.vertical import psi, resume, tables
from atoll.vertical.channel import Channel
from atoll.vertical.protocol import FeatureEndpoint, LabelRun, evaluate, steps_per_epoch


def align(parties: dict[str, tables.Table], label: str, use_psi: bool) -> list[str]:
    """The ids every party holds, sorted: the label party intersects with each other party in
    turn (PSI: each learns the intersection, nothing else), narrowing its set."""
    common = list(parties[label].ids)
    for name, t in parties.items():
        if name != label:
            held = set(t.ids)
            common = psi.intersect(common, t.ids)[0].intersection if use_psi else \
                [i for i in common if i in held]
    if not common:
        raise ValueError(f"the parties {sorted(parties)} have no id in common")
    return sorted(common)


class Setup:
    """The aligned run: the label party's driver over a channel with the other parties attached."""

    def __init__(self, cfg: dict, parties: dict[str, tables.Table]):
        name, std = cfg["name"], cfg["standardise"]
        ids = align(parties, name, cfg["psi"])
        digest = tables.digest(ids)
        self.channel, self.endpoints = Channel(), {}
        for p in cfg["parties"]:
            x, _ = tables.aligned(parties[p], ids, std, p)
            self.endpoints[p] = FeatureEndpoint(cfg | {"name": p}, (x, None, digest))
            self.channel.attach(p, self.endpoints[p])
        x, self.y = tables.aligned(parties[name], ids, std, name)
        self.run = LabelRun(cfg, self.channel, x, self.y, digest, noise_seed=cfg["seed"] + 2)
        self.channel.reset()  # hetero LR's public key: sent again on a resume, not training traffic
        self.per_epoch, self.rows = steps_per_epoch(cfg, len(ids)), len(ids)

    def checkpoint(self, epoch: int, losses: list[float]) -> bytes:
        return resume.pack(epoch=epoch, losses=list(losses), label=self.run.checkpoint(),
                           parties={p: e.checkpoint() for p, e in self.endpoints.items()})

    def restore(self, path: Path, epochs: int) -> tuple[int, list[float]]:
        """(epoch, losses) of the checkpoint at ``path``, every model and optimizer restored."""
        limit = resume.size_limit(self.run.checkpoint(), [e.checkpoint() for e in self.endpoints.values()],
                                  floats=epochs * self.per_epoch)
        ck = resume.read(path, limit, epochs)
        e, losses = ck["epoch"], resume.losses(ck, self.per_epoch, path)
        try:
            self.run.restore(ck["label"])
            if set(ck["parties"]) != set(self.endpoints):
                raise ValueError(f"parties {sorted(ck['parties'])}, not {sorted(self.endpoints)}")
            for p, endpoint in self.endpoints.items():
                endpoint.restore(ck["parties"][p])
        except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path} does not fit this run's models: {str(exc)[:300]}") from None
        return e, losses

    def model(self) -> dict:
        own = {f"{self.run.cfg['name']}.{k}": v for k, v in self.run.state().items()}
        return own | {f"{p}.{k}": v for p, e in self.endpoints.items() for k, v in e.state().items()}


def run(cfg: dict, parties: dict[str, tables.Table], run_dir, *, resume: bool = False,
        overwrite: bool = False, config_text: str | None = None) -> dict:
    """Train ``cfg`` (the ``[vertical]`` settings, seed resolved) on ``parties``' tables, writing
    ``run_dir`` (new or empty; ``resume``: continue its checkpoint); ``final.json``'s dict."""
    run_dir = Path(run_dir)
    rundir.prepare(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        rundir.check_resume(run_dir, config_text)
        if not (run_dir / checkpoint.FILE).exists():
            raise FileNotFoundError(f"no checkpoint to resume from: {run_dir / checkpoint.FILE} does not exist")
    s = Setup(cfg, parties)
    epoch, losses = s.restore(run_dir / checkpoint.FILE, cfg["epochs"]) if resume else (0, [])
    metrics, start = runlog.open_logs(run_dir, epoch, config_text), time.perf_counter()
    for e, batches in enumerate(s.run.epochs, start=1):
        if e <= epoch:
            continue  # done before the checkpoint (drawn all the same: the seed's sequence)
        mine = [s.run.step(rows) for rows in batches]
        losses += mine
        metrics.append(_line(s, e, len(losses), mine, metrics))
        runlog.append(run_dir / "metrics.jsonl", metrics[-1])
        runlog.append(run_dir / "timings.jsonl", {"round": e, "wall_s": round(time.perf_counter() - start, 4)})
        checkpoint.atomic_write(run_dir / checkpoint.FILE, s.checkpoint(e, losses))
    last = metrics[-1]
    final = {"epochs": cfg["epochs"], "steps": len(losses), "parties": [cfg["name"], *s.endpoints],
             "rows": s.rows, "test_rows": len(s.run.test),
             "train_loss": last["train_loss"], "test_loss": last["test_loss"], "test_auc": last["test_auc"],
             "test_acc": last["test_acc"], "bytes_per_step": last["bytes_cum"] / len(losses), "losses": losses}
    checkpoint.atomic_write(run_dir / "final.json", json.dumps(final, indent=1).encode())
    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in s.model().items()}, buf)
    checkpoint.atomic_write(run_dir / "model.pt", buf.getvalue())
    return final


def _line(s: Setup, epoch: int, steps: int, losses: list[float], metrics: list[dict]) -> dict:
    sent = s.channel.total()
    s.channel.reset()
    ev = evaluate(s.run.score, s.y, s.run.test)
    s.channel.reset()  # the held-out embeddings are not training traffic
    cum = (metrics[-1]["bytes_cum"] if metrics else 0) + sent
    return {"round": epoch, "epoch": epoch, "steps": steps, "train_loss": sum(losses) / len(losses),
            "test_loss": ev["loss"], "test_auc": ev["auc"], "test_acc": ev["accuracy"],
            "bytes": sent, "bytes_cum": cum}
