"""``atoll vertical serve`` (the label party) / ``atoll vertical connect`` (a feature party):
vertical training over gRPC with TLS, parties enrolled with ``atoll certs`` as for ``atoll psi``.

Each party reads its own ``[vertical]`` TOML section (docs/vertical.md) and its own CSV table
(an id column, its feature columns; the label party's also the label column), keeps the rows of
the aligned ids (the file ``atoll psi ... --out`` wrote) sorted by id, and standardises its own
columns. The first message (``hello``) checks that both sides agree on the protocol, the number of
rows and the SHA-256 of the aligned ids. Models start from ``torch.manual_seed(seed)``: the same
configuration trains the same model in one process (``build``, ``train``) and over gRPC.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atoll.checkpoint import atomic_write
from atoll.deploy import certs
from atoll.deploy.psi import dial_args, dial_creds, listen_args, read_ids
from atoll.vertical.channel import PartyError
from atoll.vertical.split import BottomParty, LabelParty, SplitNN, batches

DEFAULTS = {"protocol": "split", "id_column": "id", "label": "", "parties": [], "name": "label",
            "cut": 8, "hidden": [16], "optimizer": "adam", "lr": 0.01, "batch": 128, "epochs": 10,
            "seed": 0, "holdout": 0.3, "timeout": 60.0, "key_bits": 2048, "standardise": True}


def load(path) -> dict:
    cfg = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("vertical")
    if cfg is None:
        raise ValueError(f"{path}: no [vertical] section")
    unknown = set(cfg) - set(DEFAULTS) - {"data", "ids"}
    if unknown:
        raise ValueError(f"{path}: [vertical] has unknown keys {sorted(unknown)}")
    if cfg.get("protocol", "split") not in ("split", "hetero_lr"):
        raise ValueError(f"{path}: [vertical] protocol must be 'split' or 'hetero_lr'")
    if cfg.get("protocol") == "hetero_lr" and len(cfg.get("parties", [None])) != 1:
        raise ValueError(f"{path}: hetero_lr trains with exactly one other party ([vertical] parties)")
    base = Path(path).parent
    return DEFAULTS | cfg | {k: str(base / cfg[k]) for k in ("data", "ids") if k in cfg}


def table(cfg: dict):
    """(features, labels or None, ids digest): the aligned rows, sorted by id."""
    ids = sorted(set(read_ids(cfg["ids"])))
    with open(cfg["data"], newline="", encoding="utf-8") as f:
        rows = {r[cfg["id_column"]]: r for r in csv.DictReader(f)}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise ValueError(f"{cfg['data']}: {len(missing)} aligned ids are not in the table, e.g. {missing[0]!r}")
    cols = [c for c in next(iter(rows.values())) if c not in (cfg["id_column"], cfg["label"])]
    x = np.array([[float(rows[i][c]) for c in cols] for i in ids], dtype=np.float64)
    if cfg["standardise"]:
        x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    y = (torch.tensor([float(rows[i][cfg["label"]]) for i in ids], dtype=torch.float64)
         if cfg["label"] else None)
    return torch.from_numpy(x), y, hashlib.sha256("\n".join(ids).encode()).hexdigest()


def optimizer(cfg: dict):
    kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg["optimizer"]]
    return lambda ps: kind(ps, lr=cfg["lr"])


def bottom(cfg: dict, columns: int) -> nn.Module:
    torch.manual_seed(cfg["seed"])
    return nn.Sequential(nn.Linear(columns, cfg["cut"]), nn.ReLU()).double()


def top(cfg: dict, parties: int) -> nn.Module:
    torch.manual_seed(cfg["seed"] + 1)
    widths, layers = [cfg["cut"] * parties, *cfg["hidden"]], []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 1)).double()


def plan(cfg: dict, n: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(train rows, held-out rows, the training batches), all from the seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"]))
    train, test = perm[: n - int(cfg["holdout"] * n)], perm[n - int(cfg["holdout"] * n):]
    return train, test, [train[b] for b in batches(len(train), cfg["batch"], cfg["epochs"], cfg["seed"])]


class FeatureEndpoint:
    """A feature party's endpoint: checks the hello, then serves its bottom model (``split``)
    or its passive LR (``hetero_lr``)."""

    def __init__(self, cfg: dict):
        self.cfg, (self.x, _, self.digest) = cfg, table(cfg)
        self.inner = None

    def on(self, name: str, msg, sender: str):
        if name != "hello":
            if self.inner is None:
                raise PartyError(f"party {sender!r}: field {name!r} before the hello")
            return self.inner.on(name, msg, sender)
        try:
            theirs = json.loads(bytes(msg[:4096]).decode()) if isinstance(msg, bytes) else None
        except ValueError:
            theirs = None
        mine = hello(self.cfg, len(self.x), self.digest) | {"columns": self.x.shape[1]}
        if not isinstance(theirs, dict) or any(theirs.get(k) != mine[k] for k in AGREE):
            raise PartyError(f"party {sender!r}: field 'hello' disagrees with this party's "
                             f"{ {k: mine[k] for k in AGREE} } (got {str(theirs)[:200]})")
        if self.cfg["protocol"] == "split":
            self.inner = BottomParty(self.cfg["name"], bottom(self.cfg, self.x.shape[1]), self.x,
                                     optimizer(self.cfg))
        else:
            from atoll.vertical.hetero_lr import PassiveEndpoint
            self.inner = PassiveEndpoint(self.x, self.cfg["lr"])
        return json.dumps(mine).encode()

    def state(self) -> dict:
        model = getattr(self.inner, "model", None)
        w = getattr(getattr(self.inner, "party", None), "w", None)
        return model.state_dict() if model is not None else ({"w": w} if w is not None else {})


AGREE = ("protocol", "rows", "ids_sha256", "cut", "seed")


def hello(cfg: dict, rows: int, digest: str) -> dict:
    return {"protocol": cfg["protocol"], "rows": rows, "ids_sha256": digest, "cut": cfg["cut"],
            "seed": cfg["seed"]}


def save(path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in state.items()}, buf)  # tensors only: weights_only loads it
    atomic_write(Path(path), buf.getvalue())


def train(cfg: dict, channel, x, y, digest: str, every: int = 0) -> dict:
    """The label party's run over ``channel`` (its remote parties attached); the report. On a
    failure ``report["error"]`` says why and the models are as of the last complete step."""
    n, (_, test, steps) = len(x), plan(cfg, len(x))
    others = {}
    for p in cfg["parties"]:
        got = channel.ask(cfg["name"], p, "hello", json.dumps(hello(cfg, n, digest)).encode(), "hello")
        others[p] = json.loads(got.decode())["columns"]
    channel.reset()  # count the training traffic only
    report, t0, losses = {"protocol": cfg["protocol"], "rows": n, "steps": 0}, time.perf_counter(), []
    if cfg["protocol"] == "split":
        fn = nn.functional.binary_cross_entropy_with_logits
        label = LabelParty(cfg["name"], top(cfg, 1 + len(others)), y.unsqueeze(1), fn, optimizer(cfg),
                           {cfg["name"]: cfg["cut"]} | {p: cfg["cut"] for p in others})
        model = SplitNN([BottomParty(cfg["name"], bottom(cfg, x.shape[1]), x, optimizer(cfg))], label, channel)
        state = lambda: {f"top.{k}": v for k, v in label.top.state_dict().items()} | {  # noqa: E731
            f"bottom.{k}": v for k, v in model.parties[0].model.state_dict().items()}
        score = lambda rows: model.predict(rows).reshape(-1)  # noqa: E731
    else:
        from atoll.vertical.hetero_lr import ActiveParty, HeteroLR
        (peer, cols), = others.items()
        model = HeteroLR(ActiveParty(x, y, cfg["lr"], d_passive=cols, key_bits=cfg["key_bits"]), None,
                         channel=channel, passive=peer)
        state = lambda: {"w": model.active.w, "b": torch.tensor(model.active.b)}  # noqa: E731
        score = lambda rows: (x[rows] @ model.active.w + model.active.b  # noqa: E731
                              + channel.ask("active", peer, "eval_rows", rows, "logits"))
    try:
        for rows in steps:
            losses.append(model.step(rows))
            if every and len(losses) % every == 0:
                print(json.dumps({"step": len(losses), "loss": losses[-1]}), flush=True)
        report |= {"seconds": round(time.perf_counter() - t0, 3),
                   "bytes_per_step": channel.total() / len(losses)} | evaluate(score, y, test)
    except (PartyError, ValueError) as exc:  # ValueError: a batch below hetero LR's min_batch
        report["error"] = str(exc)
    return report | {"steps": len(losses), "losses": losses, "state": state()}


def evaluate(score, y, rows) -> dict:
    from sklearn.metrics import roc_auc_score
    with torch.no_grad():
        s = score(rows)
    truth = y[rows].numpy()
    return {"auc": float(roc_auc_score(truth, s.numpy())),
            "accuracy": float(((s > 0).double().numpy() == truth).mean())}


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
            report = train(cfg, channel, x, y, digest, args.every)
        except PartyError as exc:  # at the hello: nothing trained
            report = {"protocol": cfg["protocol"], "steps": 0, "error": str(exc), "state": {}}
        channel.close(error=report.get("error", ""))
    finally:
        server.stop()
    return _finish(args, report, report.pop("state"))


def _connect(args) -> int:
    from atoll.transport.grpc.vertical import dial, run_party
    cfg = load(args.config)
    creds = dial_creds(args)
    endpoint, report = FeatureEndpoint(cfg), {"protocol": cfg["protocol"]}
    try:
        with dial(args.address, timeout=cfg["timeout"], **creds) as link:
            report["steps"] = run_party(link, endpoint, "label")
    except PartyError as exc:
        report["error"] = str(exc)
    return _finish(args, report, endpoint.state())
