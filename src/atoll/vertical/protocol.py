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

from atoll.vertical import resume
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
    serves its bottom model (``split``) or its passive LR (``hetero_lr``). With ``run_dir`` (a
    deployed party's own folder) it checkpoints when the label party says an epoch ended
    (``checkpoint``) and resumes from the epoch the label party's hello names, if it holds it."""

    def __init__(self, cfg: dict, table, run_dir=None):
        self.cfg, (self.x, _, self.digest) = cfg, table
        self.inner, self.run_dir, self.run = None, run_dir, None
        self.epoch = self.steps = 0  # epochs checkpointed, training steps completed
        self._pending = None

    def on(self, name: str, msg, sender: str):
        if name == "hello":
            return self._hello(msg, sender)
        if self.inner is None:
            raise PartyError(f"party {sender!r}: field {name!r} before the hello")
        if name == "checkpoint":
            return self._checkpoint(msg, sender)
        out = self.inner.on(name, msg, sender)
        self.steps += name in ("gradient", "gradient_plus_mask")
        if name == "public_key":
            self._restore_pending()
        return out

    def _hello(self, msg, sender: str):
        theirs = _json(msg)
        mine = hello(self.cfg, len(self.x), self.digest) | {"columns": self.x.shape[1]}
        if not isinstance(theirs, dict) or any(theirs.get(k) != mine[k] for k in AGREE):
            raise PartyError(f"party {sender!r}: field 'hello' disagrees with this party's "
                             f"{ {k: mine[k] for k in AGREE} } (got {str(theirs)[:200]})")
        if self.inner is not None:
            raise PartyError(f"party {sender!r}: field 'hello' sent twice")
        if self.cfg["protocol"] == "split":
            self.inner = BottomParty(self.cfg["name"], bottom(self.cfg, self.x.shape[1]), self.x,
                                     optimizer(self.cfg))
            like = self.inner.model.state_dict()
        else:
            from atoll.vertical.hetero_lr import PassiveEndpoint
            self.inner = PassiveEndpoint(self.x, self.cfg["lr"])
            like = {"w": torch.zeros(self.x.shape[1], dtype=torch.float64)}
        if "run" in theirs:
            mine |= self._resume(theirs, sender, resume.size_limit(like))
            if self.cfg["protocol"] == "split":
                self._restore_pending()  # hetero LR: once the public key made the passive party
        return json.dumps(mine).encode()

    def _resume(self, theirs: dict, sender: str, limit: int) -> dict:
        """The label party checkpoints: run id and the epoch to resume from (0: the start)."""
        run, e = theirs.get("run"), theirs.get("resume")
        where = f"party {sender!r}: field 'hello'"
        if not isinstance(run, str) or not resume.RUN_ID.fullmatch(run) or type(e) is not int or e < 0:
            raise PartyError(f"{where}: 'run' must be 32 hex digits and 'resume' an epoch >= 0")
        if self.run_dir is None:
            raise PartyError(f"{where}: the label party checkpoints; this party has no run folder (--run-dir)")
        have = resume.held(self.run_dir)
        if e == 0:
            resume.clear(self.run_dir)  # a fresh start
        elif e not in have:
            raise PartyError(f"{where}: resume run {run} from epoch {e}; this party's run folder "
                             f"holds epochs {have} (no checkpoint of that epoch)")
        else:
            path = self.run_dir / f"checkpoint-{e}.pt"
            try:
                ck = resume.read(path, limit)
            except ValueError as exc:  # the peer is told what failed, not this party's paths
                raise PartyError(f"{where}: this party's checkpoint of epoch {e} is unusable: "
                                 f"{str(exc).replace(str(path), path.name)}") from None
            if ck.get("run") != run or ck.get("config") != resume.binding(self.cfg, self.digest):
                raise PartyError(f"{where}: this party's checkpoint of epoch {e} belongs to another run "
                                 f"or configuration than run {run}")
            if ck.get("epoch") != e or type(ck.get("steps")) is not int or not e <= ck["steps"] <= 10**9:
                raise PartyError(f"{where}: this party's checkpoint-{e}.pt does not hold epoch {e} "
                                 f"(steps {str(ck.get('steps'))[:20]})")
            self._pending = ck
        self.run, self.epoch, self.steps = run, e, self._pending["steps"] if self._pending else 0
        return {"run": run, "resume": e}

    def _restore_pending(self) -> None:
        if self._pending is not None:
            try:
                self.restore(self._pending["party"])
            except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as exc:
                raise PartyError(f"checkpoint of epoch {self.epoch} does not fit this party's model: "
                                 f"{str(exc)[:300]}") from None
            self._pending = None

    def _checkpoint(self, msg, sender: str) -> None:
        """The label party says epoch ``epoch`` ended after ``steps`` steps: both must follow
        this party's own count, else the claim is refused (nothing written)."""
        got = _json(msg, 200)
        want = {"epoch": self.epoch + 1, "steps": self.steps}
        if self.run is None or got != want:
            raise PartyError(f"party {sender!r}: field 'checkpoint' says {str(got)[:100]}; this party "
                             + (f"expects {want}" if self.run else "was not asked to checkpoint (hello)"))
        resume.write(self.run_dir, want["epoch"], resume.pack(
            epoch=want["epoch"], steps=self.steps, run=self.run,
            config=resume.binding(self.cfg, self.digest), party=self.checkpoint()))
        self.epoch = want["epoch"]

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
            model = self.inner.model
            model.load_state_dict(resume.check_tensors(ck["model"], model.state_dict(), "model"))
            resume.load_optimizer(self.inner.opt, ck["opt"], "bottom")
        else:
            self.inner.party.w = _tensor_like(ck["model"]["w"], self.inner.party.w, "w")


def _json(msg, limit: int = 4096):
    """A JSON object of at most ``limit`` bytes, or None."""
    try:
        out = json.loads(msg.decode()) if isinstance(msg, bytes) and len(msg) <= limit else None
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def _tensor_like(t, like: torch.Tensor, name: str) -> torch.Tensor:
    return resume.check_tensors({name: t}, {name: like}, "checkpoint")[name].clone()


class LabelRun:
    """The label party's side over ``channel`` (the other parties attached to it): the hello,
    the model, ``epochs`` (each epoch's batches), ``step``, ``score``, ``state`` and resume."""

    def __init__(self, cfg: dict, channel, x, y, digest: str, noise_seed: int | None = None,
                 resume: dict | None = None):
        """``resume``: ``{"run": id, "resume": epoch}`` when the parties checkpoint (deployed
        with ``--run-dir``): every party must answer the same, or the run stops at the hello."""
        self.cfg, self.channel, self.x, self.y = cfg, channel, x, y
        train, self.test = plan(cfg, len(x))
        self.epochs = epochs(cfg, train)
        others, mine = {}, hello(cfg, len(x), digest) | (resume or {})
        for p in cfg["parties"]:
            got = _json(channel.ask(cfg["name"], p, "hello", json.dumps(mine).encode(), "hello"))
            if not isinstance(got, dict) or type(got.get("columns")) is not int \
                    or resume and {k: got.get(k) for k in resume} != resume:
                raise PartyError(f"party {p!r}: field 'hello' answers {str(got)[:200]}, expected "
                                 f"{resume or ''} and its number of columns")
            others[p] = got["columns"]
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
        resume.check_tensors(ck["model"], self.state(), "model")
        for m, mod in self.modules.items():
            mod.load_state_dict({k[len(m) + 1:]: v for k, v in ck["model"].items() if k.startswith(m + ".")})
            resume.load_optimizer(self.opts[m], ck["opt"][m], m)
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
