"""``atoll vertical serve`` (the label party) / ``atoll vertical connect`` (a feature party):
vertical training over gRPC with TLS, parties enrolled with ``atoll certs`` as for ``atoll psi``.

Each party reads its own ``[vertical]`` TOML section (docs/vertical.md) and its own CSV table
(an id column, its feature columns; the label party's also the label column), keeps the rows of
the aligned ids (the file ``atoll psi ... --out`` wrote) sorted by id, and standardises its own
columns. The first message (``hello``) checks that both sides agree on the protocol, the number of
rows and the SHA-256 of the aligned ids. Models start from ``torch.manual_seed(seed)``: the same
configuration trains the same model in one process (``build``, ``train``) and over gRPC.

Resume (``--run-dir DIR`` on every party, ``--resume`` to continue): after every epoch the label
party tells each party to checkpoint (``checkpoint``: the epoch and the step count, which must be
the party's own), then writes its own (``atoll.vertical.resume``: ``checkpoint-<epoch>.pt``, the
two latest kept). On a restart its hello names the run id and its latest epoch; a party that
holds that epoch's checkpoint of that run and configuration restores it and answers the same,
anything else stops both at the hello, named. Only the run id and an epoch number cross.
"""
from __future__ import annotations

import io
import json
import secrets
import time
import tomllib
from pathlib import Path

import torch

from atoll.checkpoint import atomic_write
from atoll.config.vertical import VerticalConfig
from atoll.deploy import certs
from atoll.deploy.psi import dial_args, dial_creds, listen_args, read_ids
from atoll.errors import ConfigError
from atoll.vertical import protocol, resume, tables
from atoll.vertical.channel import PartyError
from atoll.vertical.protocol import LabelRun, evaluate


def load(path) -> dict:
    """The ``[vertical]`` section of ``path``, validated (``atoll.config.vertical``), as a dict;
    ``data`` and ``ids`` relative to the file."""
    from pydantic import ValidationError

    from atoll.config.files import _errors, _explain
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("vertical")
    if raw is None:
        raise ValueError(f"{path}: no [vertical] section")
    try:
        cfg = VerticalConfig.model_validate(raw).model_dump()
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(_explain(e, ("vertical",)) for e in _errors(exc))) from None
    if cfg["protocol"] == "hetero_lr" and (len(cfg["parties"]) > 1 or cfg["label"] and not cfg["parties"]):
        raise ValueError(f"{path}: hetero_lr trains with exactly one other party ([vertical] parties)")
    if isinstance(cfg["data"], dict) or not cfg["data"] or not cfg["ids"]:
        raise ValueError(f"{path}: [vertical] data is this party's table (a file name) when deployed, "
                         "and ids the aligned ids (atoll psi ... --out)")
    base = Path(path).parent
    return cfg | {"seed": cfg["seed"] or 0} | {k: str(base / cfg[k]) for k in ("data", "ids") if cfg[k]}


def table(cfg: dict):
    """(features, labels or None, ids digest): the aligned rows, sorted by id."""
    ids = sorted(set(read_ids(cfg["ids"])))
    t = tables.read_csv(cfg["data"], cfg["id_column"], cfg["label"])
    x, y = tables.aligned(t, ids, cfg["standardise"], cfg["data"])
    return x, y, tables.digest(ids)


class FeatureEndpoint(protocol.FeatureEndpoint):
    """A feature party's endpoint over its own table (``table(cfg)``); ``run_dir``: its own
    run folder, where it checkpoints when the label party says an epoch ended."""

    def __init__(self, cfg: dict, run_dir=None):
        super().__init__(cfg, table(cfg), run_dir=run_dir)


def save(path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in state.items()}, buf)  # tensors only: weights_only loads it
    atomic_write(Path(path), buf.getvalue())


def run_folder(run_dir, allow_resume: bool) -> Path:
    """This party's run folder (made if need be); one holding checkpoints only with ``--resume``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume.held(run_dir) and not allow_resume:
        raise ValueError(f"{run_dir} holds the checkpoints of epochs {resume.held(run_dir)}: pass --resume "
                         "to continue that run, or name another folder")
    return run_dir


def last_checkpoint(cfg: dict, run_dir: Path, x, digest: str) -> dict | None:
    """The label party's latest checkpoint in ``run_dir`` (None: none, a fresh start), checked:
    size, format, epoch in range, this configuration and table, the step losses."""
    have = resume.held(run_dir)
    if not have:
        return None
    path, per_epoch = run_dir / f"checkpoint-{have[-1]}.pt", protocol.steps_per_epoch(cfg, len(x))
    models = [protocol.top(cfg, 1 + len(cfg["parties"])).state_dict(),
              protocol.bottom(cfg, x.shape[1]).state_dict()] if cfg["protocol"] == "split" else [x[0]]
    ck = resume.read(path, resume.size_limit(*models, floats=cfg["epochs"] * per_epoch), cfg["epochs"])
    if ck["epoch"] != have[-1] or not isinstance(ck.get("run"), str) or not resume.RUN_ID.fullmatch(ck["run"]):
        raise ValueError(f"{path} is not the checkpoint of epoch {have[-1]} of a run")
    if ck.get("config") != resume.binding(cfg, digest):
        raise ValueError(f"{path} belongs to another configuration or table than {cfg['data']}'s: "
                         "a resume may not change the run")
    resume.losses(ck, per_epoch, path)
    return ck | {"path": str(path)}


def train(cfg: dict, channel, x, y, digest: str, every: int = 0, run_dir=None, ck: dict | None = None) -> dict:
    """The label party's run over ``channel`` (its remote parties attached); the report. On a
    failure ``report["error"]`` says why and the models are as of the last complete step.
    ``run_dir``: checkpoint there after every epoch (each party in its own folder), continuing
    from ``ck`` (``last_checkpoint``) if given."""
    hello = {"run": ck["run"] if ck else secrets.token_hex(16), "resume": ck["epoch"] if ck else 0}
    run = LabelRun(cfg, channel, x, y, digest, resume=hello if run_dir else None)
    epoch, losses = (ck["epoch"], list(ck["losses"])) if ck else (0, [])
    if ck:
        try:
            run.restore(ck["label"])
        except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{ck['path']} does not fit this party's model: {str(exc)[:300]}") from None
    report, t0, first = {"protocol": cfg["protocol"], "rows": len(x), "steps": 0}, time.perf_counter(), epoch
    try:
        for e, batches in enumerate(run.epochs, start=1):
            if e <= epoch:
                continue  # done before the checkpoint (drawn all the same: the seed's sequence)
            for rows in batches:
                losses.append(run.step(rows))
                if every and len(losses) % every == 0:
                    print(json.dumps({"step": len(losses), "loss": losses[-1]}), flush=True)
            if run_dir:  # the others first: a party that holds epoch e - 1 only is never ahead
                for p in cfg["parties"]:
                    channel.ask(cfg["name"], p, "checkpoint", json.dumps({"epoch": e, "steps": len(losses)}).encode())
                resume.write(run_dir, e, resume.pack(epoch=e, losses=losses, run=hello["run"],
                                                     config=resume.binding(cfg, digest), label=run.checkpoint()))
        sent = sum(v for k, v in channel.sent.items() if k[2] != "checkpoint")
        report |= {"seconds": round(time.perf_counter() - t0, 3), "resumed_from_epoch": first,
                   "bytes_per_step": sent / max(1, len(losses) - first * protocol.steps_per_epoch(cfg, len(x)))} \
            | evaluate(run.score, y, run.test)
    except (PartyError, ValueError) as exc:  # ValueError: a batch below hetero LR's min_batch
        report["error"] = str(exc)
    return report | {"steps": len(losses), "losses": losses, "state": run.state()}


def register(sub) -> None:
    v = sub.add_parser("vertical", help="vertical training (split NN, hetero LR) between parties",
                       description="Train on columns held by different parties (docs/vertical.md).")
    vsub = v.add_subparsers(dest="vertical_command", required=True, metavar="ACTION")
    serve = vsub.add_parser("serve", help="the label party: listen, then drive the training")
    serve.add_argument("config", help="TOML file with a [vertical] section")
    listen_args(serve)
    serve.add_argument("--wait", type=float, default=600.0, help="s to wait for the parties")
    serve.add_argument("--every", type=int, default=0, help="print the loss every N steps")
    connect = vsub.add_parser("connect", help="a feature party: dial the label party and serve")
    connect.add_argument("address", help="HOST:PORT")
    connect.add_argument("config", help="TOML file with a [vertical] section")
    dial_args(connect)
    for p in (serve, connect):
        p.add_argument("--model", help="write this party's model here (tensors; also on a failure)")
        p.add_argument("--out", help="write the report (JSON, with the losses) here")
        p.add_argument("--run-dir", help="this party's run folder: a checkpoint after every epoch "
                       "(every party needs one when the label party has one)")
        p.add_argument("--resume", action="store_true", help="continue the run whose checkpoints "
                       "--run-dir holds (the label party's latest epoch, if every party holds it)")
    serve.set_defaults(func=_serve)
    connect.set_defaults(func=_connect)


def _finish(args, report: dict, state: dict) -> int:
    if args.model and state:
        save(args.model, state)
    if args.out:
        atomic_write(Path(args.out), json.dumps(report).encode())
    short = {k: v for k, v in report.items() if k != "losses"}
    print(json.dumps(short | ({"final_loss": report["losses"][-1]} if report.get("losses") else {})),
          flush=True)
    return 1 if "error" in report else 0


def _serve(args) -> int:
    from atoll.transport.grpc.vertical import VerticalServer
    cfg, d = load(args.config), Path(args.certs)
    x, y, digest = table(cfg)
    if y is None:
        raise ValueError(f"{args.config}: the label party needs [vertical] label = COLUMN")
    run_dir = run_folder(args.run_dir, args.resume) if args.run_dir else None
    ck = last_checkpoint(cfg, run_dir, x, digest) if run_dir else None  # checked before listening
    tls = {k: (d / f).read_bytes() for k, f in (("key", "server.key"), ("cert", "server.pem"),
                                                 ("ca", "ca.pem"))}

    def identify(kind, value):
        reg = certs.load_registry(d)
        name = certs.by_certificate(reg, value) if kind == "cert" else certs.by_token(reg, value)
        return (name, name) if name else None

    server = VerticalServer(cfg["parties"], identify, address=f"{args.host}:{args.port}", tls=tls,
                            auth=args.auth, timeout=cfg["timeout"])
    print(f"atoll vertical: listening on port {server.start()}", flush=True)
    try:
        channel = server.accept(args.wait)
        try:
            report = train(cfg, channel, x, y, digest, args.every, run_dir, ck)
        except (PartyError, ValueError) as exc:  # at the hello or the restore: nothing trained
            report = {"protocol": cfg["protocol"], "steps": 0, "error": str(exc), "state": {}}
        channel.close(error=report.get("error", ""))
    finally:
        server.stop()
    return _finish(args, report, report.pop("state"))


def _connect(args) -> int:
    from atoll.transport.grpc.vertical import dial, run_party
    cfg = load(args.config)
    run_dir = run_folder(args.run_dir, args.resume) if args.run_dir else None
    creds = dial_creds(args)
    endpoint, report = FeatureEndpoint(cfg, run_dir), {"protocol": cfg["protocol"]}
    try:
        with dial(args.address, timeout=cfg["timeout"], **creds) as link:
            report["steps"] = run_party(link, endpoint, "label")
    except PartyError as exc:
        report["error"] = str(exc)
    report |= {"epochs_checkpointed": endpoint.epoch} if run_dir else {}
    return _finish(args, report, endpoint.state())
