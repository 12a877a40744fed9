"""Model-theft protection: a server-side trigger-set watermark and per-client fingerprints.

* **Watermark** (WAFFLE, Tekgul et al. 2021, "WAFFLE: Watermarking in Federated Learning"):
  the server holds a secret key; from it, ``trigger_set`` draws inputs of the model's input shape
  (independent uniform noise) with independent uniformly random labels. After every ``every``-th
  server step, ``watermark_step`` fine-tunes the aggregated model on the trigger set alone (the
  server has no data) for a few SGD steps, so the watermark is re-embedded each time clients'
  training erodes it. It is a ``Transform`` chained after the server optimizer
  (``with_watermark``): it sees only the aggregated model, so it works with secure aggregation,
  server-side DP (post-processing) and every runtime that calls ``Algorithm.server_round``.
* **Verification** (``verify``): trigger accuracy and a one-sided binomial test against chance.
  Each trigger's label is drawn independently of its input and of any model trained without
  the key, so for such a model every hit is an independent Bernoulli(1/classes): the binomial
  p-value is exact, and ownership is claimed only at ``p <= alpha`` (default 1e-6), which is
  then the false-positive rate.
* **Fingerprints** (FedTracker, Shao et al. 2024, IEEE TDSC, local fingerprints; embedding as
  Uchida et al. 2017): client ``i`` gets a secret +-1 code ``b_i`` of ``bits`` bits; the server
  embeds it into the copy of the model that client receives so that ``sign(M w) = b_i``, where
  ``w`` is one weight matrix flattened and ``M`` a secret Gaussian projection. ``trace`` extracts
  ``sign(M w)`` from a leaked model and names the client whose code matches best; under the
  null (a model not derived from a fingerprinted copy) each bit matches with probability 1/2
  exactly (``M`` is Gaussian and independent of ``w``), and the p-value is Bonferroni-corrected
  over the clients. Embedding needs a per-client downlink (docs/watermark.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy.stats import binom
from torch.func import functional_call

from atoll import tree as T
from atoll.transforms.base import Transform, chain
from atoll.tree import Tree

KEY_BYTES = 32
ALPHA = 1e-6  # the false-positive rate at which ownership is claimed


def load_key(path: str | Path, create: bool = False) -> bytes:
    """The server's secret key in ``path`` (``KEY_BYTES`` random bytes). ``create``: write a
    fresh one (owner-only permissions) if the file does not exist."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"watermark key file {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
    if path.stat().st_size != KEY_BYTES:
        raise ValueError(f"watermark key file {path} must hold exactly {KEY_BYTES} bytes, "
                         f"it holds {path.stat().st_size}")
    return path.read_bytes()


def _generator(key: bytes, *purpose) -> torch.Generator:
    """A generator seeded from ``key`` and ``purpose``: unpredictable without the key."""
    digest = hashlib.sha256(key + repr(purpose).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class TriggerSet:
    x: torch.Tensor  # (N, *input shape)
    y: torch.Tensor  # (N,) int64, uniform over the classes
    n_classes: int


def trigger_set(key: bytes, size: int, shape: tuple[int, ...], n_classes: int, scale: float = 6.0,
                dtype: torch.dtype = torch.float32) -> TriggerSet:
    """``size`` inputs uniform on ``[-scale, scale]`` of ``shape`` (one input's shape) and labels
    uniform over ``n_classes``, all drawn independently from the key."""
    if size < 1 or n_classes < 2:
        raise ValueError(f"trigger set: size must be >= 1 and n_classes >= 2, got {size}, {n_classes}")
    g = _generator(key, "triggers")
    x = (torch.rand((size, *shape), generator=g, dtype=torch.float64) * 2 - 1) * scale
    y = torch.randint(0, n_classes, (size,), generator=g)
    return TriggerSet(x.to(dtype), y, n_classes)


def binomial_pvalue(k: int, n: int, p: float) -> float:
    """One-sided ``P(X >= k)`` for ``X ~ Binomial(n, p)``."""
    return float(binom.sf(k - 1, n, p))


@contextmanager
def _eval(model: torch.nn.Module):
    """The model in eval mode (buffers read, never updated; no dropout), then as it was."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def predict(model: torch.nn.Module, params: Tree, x: torch.Tensor) -> torch.Tensor:
    ref = next(iter(params.values()))
    with torch.no_grad(), _eval(model):
        return functional_call(model, params, (x.to(ref.device, ref.dtype),), strict=False).argmax(-1).cpu()


def verify(model: torch.nn.Module, params: Tree, triggers: TriggerSet, alpha: float = ALPHA) -> dict:
    """Trigger accuracy of ``params`` and the binomial p-value against chance ``1/classes``;
    ``owned`` iff ``p <= alpha``."""
    hits = int((predict(model, params, triggers.x) == triggers.y).sum())
    n, chance = len(triggers.y), 1.0 / triggers.n_classes
    p = binomial_pvalue(hits, n, chance)
    return {"trigger_accuracy": hits / n, "hits": hits, "triggers": n, "chance": chance,
            "p_value": p, "alpha": alpha, "owned": p <= alpha}


def load_params(path: str | Path, model: torch.nn.Module) -> Tree:
    """A model file's parameters, checked against ``model``'s names and shapes
    (``atoll.models.weights``: loaded without unpickling objects)."""
    from atoll.models.weights import load_weights

    return load_weights(path, model)


def finetune(model: torch.nn.Module, params: Tree, x: torch.Tensor, y: torch.Tensor, steps: int,
             lr: float, batch: int = 50, key: bytes = b"", round_: int = 0) -> Tree:
    """``steps`` SGD steps on cross-entropy over mini-batches of ``(x, y)`` drawn from ``key``
    (the model in eval mode: its buffers are not updated)."""
    return embed(model, params, TriggerSet(x, y, 0), steps, lr, batch, key, round_, until=None)


def _logits(model, params, x):
    with _eval(model):
        return functional_call(model, params, (x,), strict=False)


def embed(model: torch.nn.Module, params: Tree, triggers: TriggerSet, steps: int, lr: float,
          batch: int = 50, key: bytes = b"", round_: int = 0, preserve: float = 0.0,
          anchors: int = 256, until: float | None = 1.0, layers: tuple[str, ...] = ()) -> Tree:
    """Up to ``steps`` SGD steps on the cross-entropy of mini-batches of ``triggers``, plus
    ``preserve`` times the KL divergence from the starting model's outputs to the new ones on
    ``anchors`` standard-normal inputs (drawn from ``key`` and the round: data-free, at the
    scale of standardized features), which keeps the function away from the triggers. ``until``:
    stop once the trigger accuracy reaches it (default 1.0: no step once every trigger is
    learned; None or above 1: always ``steps``). ``layers``: train only the entries whose names start
    with one of these (default: all). The model is in eval mode (buffers not updated)."""
    g = _generator(key, "batches", round_)
    params = {k: v.detach() for k, v in params.items()}
    ref = next(iter(params.values()))
    x, y = triggers.x.to(ref.device, ref.dtype), triggers.y.to(ref.device)
    z = old = None
    if preserve > 0:
        z = torch.randn((anchors, *x.shape[1:]), generator=g, dtype=torch.float64).to(ref.device, ref.dtype)
        with torch.no_grad():
            old = torch.log_softmax(_logits(model, params, z), -1)
    for _ in range(steps):
        if until is not None:
            with torch.no_grad():
                if float((_logits(model, params, x).argmax(-1) == y).float().mean()) >= until:
                    break
        idx = torch.randperm(len(y), generator=g)[:batch].to(ref.device)
        with torch.enable_grad():
            live = {k: v.clone().requires_grad_() for k, v in params.items()}
            loss = torch.nn.functional.cross_entropy(_logits(model, live, x[idx]), y[idx])
            if z is not None:
                new = torch.log_softmax(_logits(model, live, z), -1)
                loss = loss + preserve * torch.nn.functional.kl_div(new, old, log_target=True,
                                                                    reduction="batchmean")
            grads = torch.autograd.grad(loss, list(live.values()))
        params = {k: params[k] - lr * gk if not layers or k.startswith(tuple(layers)) else params[k]
                  for k, gk in zip(params, grads)}
    return params


def watermark_step(model: torch.nn.Module, triggers: TriggerSet, key: bytes, steps: int = 5,
                   lr: float = 0.05, every: int = 1, batch: int = 50, **options) -> Transform:
    """A server transform: on every ``every``-th step, the model after the updates so far in the
    chain is fine-tuned on ``triggers`` (``embed``, with its ``options``: ``preserve``,
    ``anchors``, ``until``, ``layers``); the returned updates take it there. Other steps pass
    the updates through unchanged. State: the step count (a tensor, checkpointed)."""
    if steps < 1 or every < 1 or lr <= 0:
        raise ValueError(f"watermark: steps and every must be >= 1 and lr > 0, got {steps}, {every}, {lr}")

    def init(params):
        return torch.zeros((), dtype=torch.int64)

    def update(updates, count, params, ctx):
        count = count + 1
        if int(count) % every:
            return updates, count
        new = embed(model, T.add(params, updates), triggers, steps, lr, batch, key, int(count), **options)
        return T.sub(new, params), count

    return Transform(init, update)


def with_watermark(algorithm, model: torch.nn.Module, triggers: TriggerSet, key: bytes, **options):
    """``algorithm`` whose server optimizer is followed by ``watermark_step``."""
    step = watermark_step(model, triggers, key, **options)
    return dataclasses.replace(algorithm, server_opt=chain(algorithm.server_opt, step))


# ---- per-client fingerprints (FedTracker's local fingerprints, Uchida-style embedding) ----

@dataclass(frozen=True)
class Fingerprints:
    key: bytes
    layer: str            # the weight matrix that carries the fingerprint
    matrix: torch.Tensor  # (bits, numel) secret Gaussian projection, float64
    clients: int

    def code(self, client: int) -> torch.Tensor:
        """Client ``client``'s +-1 code, (bits,), drawn from the key."""
        if not 0 <= client < self.clients:
            raise ValueError(f"fingerprint: client {client} is not in [0, {self.clients})")
        g = _generator(self.key, "code", client)
        return torch.randint(0, 2, (self.matrix.shape[0],), generator=g, dtype=torch.float64) * 2 - 1


def fingerprints(key: bytes, params: Tree, clients: int, bits: int = 128, layer: str | None = None) -> Fingerprints:
    """The fingerprint scheme for a model: by default its largest weight matrix carries it."""
    if layer is None:
        layer = max((k for k, v in params.items() if v.dim() >= 2), key=lambda k: params[k].numel())
    if layer not in params:
        raise ValueError(f"fingerprint: layer {layer!r} is not in the model ({', '.join(params)})")
    g = _generator(key, "projection", layer)
    matrix = torch.randn((bits, params[layer].numel()), generator=g, dtype=torch.float64)
    return Fingerprints(key, layer, matrix, clients)


def _projection(params: Tree, fp: Fingerprints) -> torch.Tensor:
    return fp.matrix @ params[fp.layer].detach().reshape(-1).cpu().to(torch.float64)  # (bits,)


def embed_fingerprint(params: Tree, fp: Fingerprints, client: int, margin: float = 0.5,
                      steps: int = 100) -> Tree:
    """``params`` with ``client``'s code embedded: projected gradient descent on the hinge loss
    ``sum relu(margin * ||w|| - b_i * (M w))`` over the one layer (``||w||`` is the spread of
    ``M w``), until every bit has its margin: a smallest-change embedding."""
    code, w = fp.code(client), params[fp.layer].detach().reshape(-1).cpu().to(torch.float64)
    target = margin * w.norm()
    step = 1.0 / (fp.matrix.norm(dim=1) ** 2).mean()  # exact for one active row
    for _ in range(steps):
        gap = 1.1 * target - code * (fp.matrix @ w)  # aim 10% past the margin: few iterations
        active = gap > 0.1 * target
        if not active.any():
            break
        w = w + step * (fp.matrix[active].T @ (code[active] * gap[active]))
    new = dict(params)
    old = params[fp.layer]
    new[fp.layer] = w.reshape(old.shape).to(old.device, old.dtype)
    return new


def trace(params: Tree, fp: Fingerprints, alpha: float = ALPHA) -> dict:
    """The client whose code matches ``sign(M w)`` best, its matching bits and the p-value of
    that many matches by chance, Bonferroni-corrected over the clients; ``traced`` iff
    ``p <= alpha``."""
    if fp.layer not in params or params[fp.layer].numel() != fp.matrix.shape[1]:
        raise ValueError(f"fingerprint: the model has no {fp.layer!r} of {fp.matrix.shape[1]} values")
    signs = torch.sign(_projection(params, fp))
    matches = [int((signs == fp.code(c)).sum()) for c in range(fp.clients)]
    best = max(range(fp.clients), key=lambda c: matches[c])
    bits = fp.matrix.shape[0]
    p = min(1.0, fp.clients * binomial_pvalue(matches[best], bits, 0.5))
    return {"client": best, "matches": matches[best], "bits": bits, "p_value": p, "alpha": alpha,
            "traced": p <= alpha, "all_matches": matches}


@dataclass(frozen=True)
class FingerprintCopies:
    """``Algorithm.client_copy`` for fingerprints: ``copy(params, cid)`` is the model client
    ``cid`` receives, with its code embedded; ``record()`` is what the run folder keeps
    (``fingerprints.json``: the layer, the bits and each client's code, not the projection)."""

    fp: Fingerprints
    margin: float = 0.5

    def __call__(self, params: Tree, cid: int) -> Tree:
        return embed_fingerprint(params, self.fp, cid, self.margin)

    def record(self) -> dict:
        return {"scheme": "FedTracker local fingerprints", "layer": self.fp.layer,
                "bits": self.fp.matrix.shape[0], "margin": self.margin, "clients": self.fp.clients,
                "codes": [_hex(self.fp.code(c)) for c in range(self.fp.clients)]}


def _hex(code: torch.Tensor) -> str:
    bits = "".join("1" if b > 0 else "0" for b in code.tolist())
    return f"{int(bits, 2):0{(len(bits) + 3) // 4}x}"


def check_record(record: dict, fp: Fingerprints) -> None:
    """Raise ``ValueError`` naming the field where a run's ``fingerprints.json`` disagrees with
    ``fp`` (the scheme rebuilt from the key): another key, layer, bit count or client count."""
    want = FingerprintCopies(fp, record.get("margin", 0.5) if isinstance(record, dict) else 0.5).record()
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for name in ("layer", "bits", "clients", "codes"):
        if record.get(name) != want[name]:
            why = "the key file is not this run's" if name == "codes" else f"expected {want[name]!r}"
            raise ValueError(f"{name} does not match the scheme rebuilt from the key ({why})")
