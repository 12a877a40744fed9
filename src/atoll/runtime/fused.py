"""A hand-fused chunk engine for ReLU MLPs trained locally by plain SGD.

``match(client_update)`` recognises a ``ClientUpdate`` built as
``local_training(model_loss(model), transform)`` (its declared ``loss``, a ``ModelLoss``, and
``transform``, read through the transforms' ``spec``: plain data, no code objects or closures)
where ``model`` is an ``nn.Linear`` or an ``nn.Sequential`` of ``Linear`` layers joined by
``ReLU`` (no hooks, no buffers) and ``transform`` is ``sgd(lr, momentum=0, weight_decay)``,
optionally chained after ``proximal(mu)`` / ``add_decayed_weights`` corrections. Anything
else returns ``None`` and the generic ``vmap`` engine runs instead, so the fast path never
changes what another model or transform computes.

For such a client the local step is, with ``a`` the step mask and ``W0`` the global model::

    W <- W - lr * (grad + mu * (W - W0) + wd * W)      if a[s], else unchanged

and this engine computes it with one batched product per layer and direction
(``baddbmm`` into the stacked weights ``(C, out, in)``, in place, no autograd):

* step 0: every client starts from ``W0``, so the forward pass and the backward pass to the
  activations are single shared products over the chunk's ``C * B`` samples; only the
  per-client weight gradients (rank ``B``) are per-client products;
* steps ``s >= 1``: step masks are prefixes and the chunk is sorted by active steps, so the
  clients active at step ``s`` are a leading block ``[:m_s]`` and inactive clients are
  skipped, not masked; their weights stay bit-identical.

Equivalence with ``LoopRuntime`` (float64, 1e-9) is tested in ``tests/runtime``. One
documented difference: the loss metric of a masked step is never evaluated here, whereas
``local_training`` adds ``0 * loss``, which differs only when that loss is NaN or infinite.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atoll.client import ModelLoss, as_update
from atoll.runtime.engine import ChunkResult, VmapEngine


@dataclass(frozen=True)
class FusedSpec:
    layers: tuple[tuple[str, str | None], ...]  # (weight key, bias key or None) per Linear
    lr: float
    mu: float
    wd: float
    client_update: object


def match(client_update) -> FusedSpec | None:
    """The fused plan for ``client_update``, or None where the generic path must run."""
    update = as_update(client_update)
    loss_fn, transform = update.loss, update.transform
    if transform is None or not isinstance(loss_fn, ModelLoss):  # not plain local_training
        return None
    layers, coeffs = _mlp_layers(loss_fn.model), _sgd_coeffs(transform)
    if layers is None or coeffs is None:
        return None
    return FusedSpec(layers, *coeffs, client_update=client_update)


def _mlp_layers(model) -> tuple | None:
    """``((w, b), ...)`` parameter names of Linear [ReLU Linear]*, or None."""
    if type(model) is nn.Linear:
        mods, prefix = [model], [""]
    elif type(model) is nn.Sequential:
        mods, prefix = list(model), [f"{i}." for i in range(len(model))]
    else:
        return None
    kinds = [type(m) for m in mods]
    if not kinds or kinds[0] is not nn.Linear or len(kinds) % 2 == 0:
        return None
    if any(k is not (nn.Linear if i % 2 == 0 else nn.ReLU) for i, k in enumerate(kinds)):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in [model, *mods]):
        return None
    if list(model.buffers()) or nn.modules.module._global_forward_hooks:
        return None
    return tuple((f"{prefix[i]}weight", f"{prefix[i]}bias" if mods[i].bias is not None else None)
                 for i in range(0, len(mods), 2))


def _sgd_coeffs(transform) -> tuple[float, float, float] | None:
    """``(lr, mu, wd)`` for [proximal | add_decayed_weights | identity]* then sgd(momentum=0),
    read from the transforms' ``spec`` (plain data), never from their closures."""
    parts = _flatten(transform.spec)
    if not parts or parts[-1][0] != "sgd" or parts[-1][2] != 0.0:
        return None
    lr, wd, mu = parts[-1][1], parts[-1][5], 0.0
    for spec in parts[:-1]:
        if spec[0] == "proximal":
            mu += spec[1]
        elif spec[0] == "decay":
            wd += spec[1]
        elif spec[0] != "identity":
            return None
    return lr, mu, wd


def _flatten(spec: tuple) -> list:
    """The leaf specs of a chain in order ([] where any part has no spec)."""
    if not spec:
        return []
    if spec[0] != "chain":
        return [spec]
    out = []
    for sub in spec[1]:
        leaves = _flatten(sub)
        if not leaves:
            return []
        out += leaves
    return out


OUTER_MAX = 2  # up to this many samples per client and step, weight gradients are outer products


def _trim(batches: dict) -> dict:
    """The batches without the trailing sample slots that are masked in every client and step
    (clients smaller than a batch): they add exact zeros, so dropping them changes nothing."""
    mask = batches["mask"]
    if bool(mask[..., -1].any()):  # the last slot is used: nothing to trim
        return batches
    used = mask.reshape(-1, mask.shape[-1]).any(0).nonzero()
    width = int(used.max()) + 1 if used.numel() else 1
    if width == mask.shape[-1]:
        return batches
    return {k: v[:, :, :width] for k, v in batches.items()}


class FusedMLP:
    """The fused engine (see the module docstring); runs the generic engine where a chunk
    does not fit its assumptions (step masks that are not sorted prefixes, other shapes)."""

    name = "fused-mlp"

    def __init__(self, spec: FusedSpec):
        self.spec = spec
        self.fallback = VmapEngine(spec.client_update)

    def run(self, params, cstates, broadcast, batches, step_mask, keys, out=None) -> ChunkResult:
        """``out``: optional ``(C, ...)`` tensors like the stacked params (any strides) that
        become the weights being trained and finally the deltas (the uplink messages' rows)."""
        if not self._fits(params, batches, step_mask):
            return self.fallback.run(params, cstates, broadcast, batches, step_mask, keys)
        with torch.no_grad():
            delta, loss, seen, ks = self._train(params, _trim(batches), step_mask, out)
        return ChunkResult({k: v.cpu() for k, v in delta.items()}, {}, cstates,
                           loss.tolist(), seen.tolist(), ks)

    def _fits(self, params, batches, step_mask) -> bool:
        keys = {k for w, b in self.spec.layers for k in (w, b) if k}
        x, W0 = batches["x"], params[self.spec.layers[0][0]]
        if set(params) != keys or x.dim() != 4 or x.dtype != W0.dtype or x.shape[-1] != W0.shape[1]:
            return False
        ks = step_mask.sum(1)
        prefix = torch.arange(step_mask.shape[1], device=step_mask.device) < ks[:, None]
        return bool(torch.equal(step_mask, prefix)) and bool((ks[:-1] >= ks[1:]).all())

    def _train(self, params, batches, step_mask, out=None):
        """Weights ``(C, out, in)`` trained in place (in ``out`` where given); returns
        (delta, loss, samples, steps)."""
        sp, (x, y, mask) = self.spec, (batches["x"], batches["y"], batches["mask"])
        C, S, B = mask.shape
        W0 = [params[w] for w, _ in sp.layers]
        b0 = [params[b] if b else None for _, b in sp.layers]
        dt = W0[0].dtype
        n = mask.sum(-1).to(dt)                                    # (C, S)
        wgt = (mask.to(dt) / n.clamp(min=1.0)[..., None])[..., None]  # (C, S, B, 1)
        target = F.one_hot(y, W0[-1].shape[0]).to(dt) * wgt        # (C, S, B, K)
        ks = step_mask.sum(1).tolist()
        loss = torch.zeros(C, dtype=dt, device=x.device)
        as_delta = max(ks, default=0) <= 1   # one step at most: write the deltas directly
        own = lambda k, v: out[k] if out is not None else v.new_empty((C, *v.shape))  # noqa: E731
        W = [own(wk, w) for (wk, _), w in zip(sp.layers, W0)]
        b = [own(bk, v) if v is not None else None for (_, bk), v in zip(sp.layers, b0)]
        m0 = sum(k > 0 for k in ks)
        for w, w0 in zip(W + b, W0 + b0):  # clients without a step keep W0 (delta 0)
            if w is not None and m0 < C:
                w[m0:] = 0.0 if as_delta else w0
        used = mask[:, 0]                                          # slots of step 0 (C, B)
        last = C - used.flip(0).to(torch.uint8).argmax(0)          # 1 + last client using a slot
        lead = torch.where(used.any(0), last, 0).tolist()
        ctx = (W, b, W0, b0, wgt, target, n, loss, as_delta, lead)
        for s in range(S):
            m = sum(k > s for k in ks)
            if m == 0:
                break
            self._step(ctx, x[:m, s], s, m)
        delta = {}
        for (wk, bk), w, w0, v, v0 in zip(sp.layers, W, W0, b, b0):
            delta[wk] = w if as_delta else w.sub_(w0)
            if bk:
                delta[bk] = v if as_delta else v.sub_(v0)
        seen = (n * step_mask.to(dt)).sum(1)
        return {k: delta[k] for k in params}, loss / seen.clamp(min=1.0), seen, ks

    def _step(self, ctx, h, s, m):
        """One SGD step of the ``m`` leading clients on ``h`` ``(m, B, F)``."""
        W, b, W0, b0, wgt, target, n, loss, as_delta, lead = ctx
        L, shared = len(W), s == 0
        acts = [h.reshape(-1, h.shape[-1]) if shared else h]
        for l in range(L):                                         # forward
            if shared:
                z = acts[l] @ W0[l].T if b0[l] is None else torch.addmm(b0[l], acts[l], W0[l].T)
            elif b[l] is None:
                z = torch.bmm(acts[l], W[l][:m].transpose(1, 2))
            else:
                z = torch.baddbmm(b[l][:m, None], acts[l], W[l][:m].transpose(1, 2))
            if l < L - 1:
                acts.append(z.clamp_(min=0.0))
        lsm = torch.log_softmax(z.view(m, -1, z.shape[-1]), -1)   # (m, B, K)
        tgt = target[:m, s]
        loss[:m] -= (lsm * tgt).sum((1, 2)) * n[:m, s]
        delta = lsm.exp_().mul_(wgt[:m, s]).sub_(tgt)              # dLoss/dlogits (m, B, K)
        for l in reversed(range(L)):                               # backward + update
            h_l = acts[l].view(m, -1, acts[l].shape[-1])
            prev = None
            if l > 0:
                w = W0[l] if shared else W[l][:m]
                prev = (delta.view(-1, delta.shape[-1]) @ w).view(m, -1, w.shape[-1]) if shared \
                    else torch.bmm(delta, w)
                prev = torch.ops.aten.threshold_backward(prev, h_l, 0.0)
            if shared:
                self._first(W[l][:m], W0[l], delta.transpose(1, 2), h_l, as_delta, lead)
                if b[l] is not None:
                    self._first(b[l][:m], b0[l], delta.sum(1), None, as_delta)
            else:
                self._update(W[l][:m], W0[l], delta.transpose(1, 2), h_l)
                if b[l] is not None:
                    self._update(b[l][:m], b0[l], delta.sum(1), None)
            delta = prev

    def _first(self, out, p0, g_left, g_right, as_delta, lead=None):
        """Step 0 writes ``out = p0 - lr * (g + wd * p0)`` (or that minus ``p0``: the delta)
        in one pass; the proximal term is zero at ``p = p0``. ``lead[j]``: only the clients
        before it use sample slot ``j`` (the others' slot-``j`` gradient is exactly zero)."""
        lr, wd = self.spec.lr, self.spec.wd
        beta = -lr * wd if as_delta else 1.0 - lr * wd
        if g_right is None:
            torch.mul(g_left, -lr, out=out)
        elif g_right.shape[1] <= OUTER_MAX:  # rank 1 or 2: outer products beat a batched gemm
            left = g_left * -lr
            torch.mul(left[..., 0, None], g_right[:, 0, None], out=out)
            for j in range(1, g_right.shape[1]):
                m = min(lead[j], out.shape[0]) if lead else out.shape[0]
                out[:m].addcmul_(left[:m, :, j, None], g_right[:m, j, None])
        else:
            torch.baddbmm(p0.expand(out.shape), g_left, g_right, beta=beta, alpha=-lr, out=out)
            return
        if beta:
            out.add_(p0, alpha=beta)

    def _update(self, p, p0, g_left, g_right):
        """``p <- p - lr * (g + mu * (p - p0) + wd * p)`` in place; ``g = g_left @ g_right``
        (a weight) or ``g = g_left`` (a bias)."""
        lr, mu, wd = self.spec.lr, self.spec.mu, self.spec.wd
        if mu or wd:
            p.mul_(1.0 - lr * (mu + wd))
            if mu:
                p.add_(p0, alpha=lr * mu)
        if g_right is None:
            p.sub_(g_left, alpha=lr)
        else:
            p.baddbmm_(g_left, g_right, alpha=-lr)
