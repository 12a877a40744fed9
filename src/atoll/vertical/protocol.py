"""A configured vertical run, shared by the simulation (``atoll run``, ``atoll.vertical.experiment``)
and the deployment (``atoll vertical serve|connect``, ``atoll.deploy.vertical``): the models built
from the ``[vertical]`` settings (a dict), the label party's driver (``LabelRun``) and a feature
party's endpoint (``FeatureEndpoint``). Models start from ``torch.manual_seed(seed)``, so the same
settings train the same model in one process and over gRPC.
"""
from __future__ import annotations

import json
import math

import torch
from torch import nn

from atoll.vertical.channel import PartyError
from atoll.vertical.split import BottomParty, LabelParty, SplitNN

AGREE = ("protocol", "rows", "ids_sha256", "cut", "seed")


def optimizer(cfg: dict):
    kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg["optimizer"]]
    return lambda ps: kind(ps, lr=cfg["lr"])


def _mlp(widths: list[int], last_relu: bool) -> nn.Sequential:
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*(layers if last_relu else layers[:-1])).double()


def bottom(cfg: dict, columns: int) -> nn.Module:
    """This party's bottom model: its columns -> its ``bottom`` hidden widths -> ``cut``, ReLU."""
    torch.manual_seed(cfg["seed"])
    b = cfg.get("bottom") or []
    own = b.get(cfg["name"], []) if isinstance(b, dict) else b
    return _mlp([columns, *own, cfg["cut"]], last_relu=True)


def top(cfg: dict, parties: int) -> nn.Module:
    torch.manual_seed(cfg["seed"] + 1)
    return _mlp([cfg["cut"] * parties, *cfg["hidden"], 1], last_relu=False)


def plan(cfg: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows), from the seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"]))
    return perm[: n - int(cfg["holdout"] * n)], perm[n - int(cfg["holdout"] * n):]


def epochs(cfg: dict, train: torch.Tensor):
    """Each epoch's training batches (lists of rows), drawn lazily in order from the seed: the
    batches of ``split.batches(len(train), batch, epochs, seed)``, never all held at once."""
    g = torch.Generator().manual_seed(cfg["seed"])
    for _ in range(cfg["epochs"]):
        yield [train[b] for b in torch.randperm(len(train), generator=g).split(cfg["batch"])]


def steps_per_epoch(cfg: dict, n: int) -> int:
    return math.ceil((n - int(cfg["holdout"] * n)) / cfg["batch"])


def hello(cfg: dict, rows: int, digest: str) -> dict:
    return {"protocol": cfg["protocol"], "rows": rows, "ids_sha256": digest, "cut": cfg["cut"],
            "seed": cfg["seed"]}


class FeatureEndpoint:
    """A feature party's endpoint over its table ``(x, _, ids digest)``: checks the hello, then
    serves its bottom model (``split``) or its passive LR (``hetero_lr``)."""

    def __init__(self, cfg: dict, table):
        self.cfg, (self.x, _, self.digest) = cfg, table
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

    def checkpoint(self) -> dict:
        """What a resume needs: the model and (split) the optimizer's state."""
        opt = getattr(self.inner, "opt", None)
        return {"model": dict(self.state())} | ({"opt": opt.state_dict()} if opt is not None else {})

    def restore(self, ck: dict) -> None:
        if "opt" in ck:
            self.inner.model.load_state_dict(ck["model"])
            self.inner.opt.load_state_dict(ck["opt"])
        else:
            self.inner.party.w = _tensor_like(ck["model"]["w"], self.inner.party.w, "w")


def _tensor_like(t, like: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.shape != like.shape or t.dtype != like.dtype:
        raise ValueError(f"checkpoint: {name!r} is not a {like.dtype} tensor of shape {tuple(like.shape)}")
    return t.clone()


class LabelRun:
    """The label party's side over ``channel`` (the other parties attached to it): the hello,
    the model, ``epochs`` (each epoch's batches), ``step``, ``score``, ``state`` and resume."""

    def __init__(self, cfg: dict, channel, x, y, digest: str, noise_seed: int | None = None):
        self.cfg, self.channel, self.x, self.y = cfg, channel, x, y
        train, self.test = plan(cfg, len(x))
        self.epochs = epochs(cfg, train)
        others = {}
        for p in cfg["parties"]:
            got = channel.ask(cfg["name"], p, "hello", json.dumps(hello(cfg, len(x), digest)).encode(), "hello")
            others[p] = json.loads(got.decode())["columns"]
        channel.reset()  # count the training traffic only
        (self._split if cfg["protocol"] == "split" else self._hetero)(others, noise_seed)

    def _split(self, others: dict, noise_seed) -> None:
        cfg, fn = self.cfg, nn.functional.binary_cross_entropy_with_logits
        self.label = LabelParty(cfg["name"], top(cfg, 1 + len(others)), self.y.unsqueeze(1), fn,
                                optimizer(cfg), {cfg["name"]: cfg["cut"]} | {p: cfg["cut"] for p in others},
                                noise_std=cfg.get("noise", 0.0), noise_seed=noise_seed)
        own = BottomParty(cfg["name"], bottom(cfg, self.x.shape[1]), self.x, optimizer(cfg))
        self.model = SplitNN([own], self.label, self.channel)
        self.modules = {"top": self.label.top, "bottom": own.model}
        self.opts = {"top": self.label.opt, "bottom": own.opt}

    def _hetero(self, others: dict, noise_seed) -> None:
        from atoll.vertical.hetero_lr import ActiveParty, HeteroLR
        (self.peer, cols), = others.items()
        active = ActiveParty(self.x, self.y, self.cfg["lr"], d_passive=cols, key_bits=self.cfg["key_bits"])
        self.model = HeteroLR(active, None, channel=self.channel, passive=self.peer)
        self.modules, self.opts = {}, {}

    def step(self, rows: torch.Tensor) -> float:
        return self.model.step(rows)

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        if self.modules:
            return self.model.predict(rows).reshape(-1)
        a = self.model.active
        return self.x[rows] @ a.w + a.b + self.channel.ask("active", self.peer, "eval_rows", rows, "logits")

    def state(self) -> dict:
        """The label party's own tensors (what ``--model`` writes)."""
        if not self.modules:
            return {"w": self.model.active.w, "b": torch.tensor(self.model.active.b, dtype=torch.float64)}
        return {f"{m}.{k}": v for m, mod in self.modules.items() for k, v in mod.state_dict().items()}

    def checkpoint(self) -> dict:
        ck = {"model": self.state(), "opt": {k: o.state_dict() for k, o in self.opts.items()}}
        return ck | ({"noise": self.label.gen.get_state()} if self.modules else {})

    def restore(self, ck: dict) -> None:
        if not self.modules:
            a = self.model.active
            a.w = _tensor_like(ck["model"]["w"], a.w, "w")
            a.b = float(_tensor_like(ck["model"]["b"], torch.tensor(a.b, dtype=torch.float64), "b"))
            return
        for m, mod in self.modules.items():
            mod.load_state_dict({k[len(m) + 1:]: v for k, v in ck["model"].items() if k.startswith(m + ".")})
            self.opts[m].load_state_dict(ck["opt"][m])
        self.label.gen.set_state(_tensor_like(ck["noise"], self.label.gen.get_state(), "noise"))


def evaluate(score, y, rows) -> dict:
    """Held-out ROC AUC (None if the rows hold one class), accuracy and logistic loss."""
    from sklearn.metrics import roc_auc_score
    with torch.no_grad():
        s = score(rows)
    truth = y[rows]
    one_class = bool((truth == truth[0]).all())
    return {"auc": None if one_class else float(roc_auc_score(truth.numpy(), s.numpy())),
            "accuracy": float(((s > 0).double() == truth).double().mean()),
            "loss": float(nn.functional.binary_cross_entropy_with_logits(s, truth))}
