"""The round's server half behind a secure sum (``[secure]``; docs/secure-aggregation.md).

What each client adds into the sum is laid out once (``layout``) and read the same way by the
simulation (``secure_round``) and the deployed client and coordinator (``deploy.secure_client``,
``deploy.coordinator``):

* a plain uplink: the client's decoded delta, then the ``aux`` of an algorithm whose server
  reads only the aux mean (``server_aux``: SCAFFOLD, FedaGrac's seed form), in ``aux_spec``
  order (the order ``runtime.check`` returns a client's aux in);
* a linear uplink codec (a count sketch, masked rand-k): the data entries of its payload,
  summed as they are and decoded once from the mean (FetchSGD), then the aux. The payload's
  other entries (shapes, the round's hash seed) are the round's, known to every party from the
  round's shared codec (``round.uplink_codec``); a client whose entries differ is left out with
  the reason (``summand``).

The server then steps on the sums' means (``secure_step``): one per bucket, rows of weight one
for the aggregator.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from atoll import rng
from atoll import tree as T
from atoll.runtime.base import uplink_codec
from atoll.transport import wire

log = logging.getLogger("atoll")


@dataclass(frozen=True)
class Layout:
    like: dict   # the tree every client adds: T.join({"delta": ..., "aux": ...})
    meta: dict   # a linear codec's shared payload entries (empty for a plain uplink)
    plain: bool


def layout(algorithm, params, seed: int, r: int) -> Layout:
    """Round ``r``'s layout of a client's summand (the module docstring)."""
    dtype = next(iter(params.values())).dtype
    aux = {k: torch.zeros(shape, dtype=want or dtype)
           for k, (shape, want, _, _) in algorithm.aux_spec(params).items()}
    if algorithm.uplink.plain:
        return Layout(T.join({"delta": params, "aux": aux}), {}, True)
    codec = uplink_codec(algorithm, seed, r)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    payload, _ = codec.encode(zero, codec.init(zero), 0)
    data = {k: v for k, v in payload.items() if v.is_floating_point() and v.numel() > 0}
    meta = {k: v for k, v in payload.items() if k not in data}
    return Layout(T.join({"delta": data, "aux": aux}), meta, False)


def summand(lay: Layout, delta: dict, aux: dict) -> dict:
    """What one client adds: its decoded ``delta`` (plain uplink) or its payload (linear codec),
    then its checked ``aux``; ValueError naming the entry where a payload is not the round's."""
    if not lay.plain:
        like = T.split(lay.like)["delta"]
        if set(delta) != set(like) | set(lay.meta):
            raise ValueError(f"secure: the payload has entries {sorted(delta)[:4]}, the round's "
                             f"codec {sorted(set(like) | set(lay.meta))[:4]}")
        for k, v in lay.meta.items():
            if delta[k].dtype != v.dtype or not torch.equal(delta[k], v):
                raise ValueError(f"secure: the payload's {k!r} is not the round's (another "
                                 "round's hashes or another codec)")
        for k, v in like.items():
            if delta[k].shape != v.shape or not delta[k].is_floating_point():
                raise ValueError(f"secure: the payload's {k!r} has shape {tuple(delta[k].shape)}, "
                                 f"the round's codec {tuple(v.shape)}")
        delta = {k: delta[k] for k in like}
    return T.join({"delta": delta, "aux": aux or {}})


def mean_update(algorithm, lay: Layout, mean: dict) -> dict:
    """``{"delta": mean delta, "aux": mean aux}`` from the mean of the summands."""
    parts = T.split(mean)
    delta = parts.get("delta", {})
    if not lay.plain:
        delta = algorithm.uplink.decode({**lay.meta, **delta})
    return {"delta": delta, "aux": parts.get("aux", {})}


def secure_round(algorithm, state, kept, deltas, aux, data, stats, seed: int):
    """The server step on secure sums of the kept clients' updates: each client's half
    (``SecureSum.encode``, from its own key) runs on its own row; the server only gets the
    protocol's sum of each bucket (one bucket: the cohort; ``aggregator.bucket``: random
    buckets, whose means the aggregator's robust rule combines). A bucket that cannot finish
    securely is left out; with none left the model is unchanged."""
    from atoll.secure.secagg import SecAggError

    r, sec = state.round + 1, algorithm.secure
    lay = layout(algorithm, state.params, seed, r)
    rows = {}
    for i, o in enumerate(kept):
        try:
            delta = (T.split(wire.loads(o.message))["delta"] if not lay.plain
                     else {k: v[i] for k, v in deltas.items()})
            rows[o.cid] = summand(lay, delta, {k: v[i] for k, v in (aux or {}).items()})
        except ValueError as exc:
            stats.failures.append((o.cid, str(exc)))
            log.warning("round %d: client %d left out of the secure sum: %s", r, o.cid, exc)
    if not rows:
        return algorithm.server_round(state, None, None)
    ids = list(rows)
    if algorithm.adversary is not None:  # simulation: attackers are clients, they attack what they encode
        stacked = algorithm.adversary(T.stack(list(rows.values())), ids, r,
                                      rng.key(seed, r, rng.SERVER, "server"))
        rows = {cid: {k: v[i] for k, v in stacked.items()} for i, cid in enumerate(ids)}
    inputs = {cid: sec.encode(rows[cid], data.clients[cid].n, rng.key(seed, r, cid, "secure"))
              for cid in ids}

    def sum_bucket(group):
        try:
            mean, extra = sec.aggregate({c: inputs[c] for c in group}, r, lay.like)
        except SecAggError as exc:  # also he.HEError
            stats.failures.append((-1, f"secure aggregation failed ({len(group)} clients): {exc}"))
            log.warning("round %d: secure aggregation failed, bucket left out: %s", r, exc)
            return None
        stats.failures.extend(extra.pop("secure_rejected", []))  # he: ciphertexts that did not load
        return mean, extra

    state = step_on_buckets(algorithm, state, ids, lay, seed, sum_bucket, stats.extra)
    if "secure_bytes_up" in stats.extra:
        stats.bytes_up = stats.extra["secure_bytes_up"] * stats.extra["secure_survivors"]
    return state


def step_on_buckets(algorithm, state, ids: list[int], lay: Layout, seed: int, sum_bucket,
                    extra: dict):
    """The server step over the round's buckets of ``ids`` (one bucket, the cohort, without
    ``aggregator.bucket``), in the simulation and the deployed coordinator alike:
    ``sum_bucket(group)`` is ``(mean summand, stats)`` or None where that bucket could not finish
    securely (left out; the caller records why). The aggregator's rule runs over the buckets'
    means; ``extra`` (the round's metrics) gets the merged stats. No bucket left: the model stays."""
    r, sec = state.round + 1, algorithm.secure
    means, heads, seen = [], [], []
    for group in sec.buckets(ids, rng.key(seed, r, rng.SERVER, "secure-buckets")):
        got = sum_bucket(group)
        if got is not None:
            means.append(mean_update(algorithm, lay, got[0]))
            heads.append(group[0])
            seen.append(got[1])
    if not means:
        return algorithm.server_round(state, None, None)
    extra.update(merge_secure_stats(seen, sec.bucket))
    return secure_step(algorithm, state, means, heads, seed, cohort=extra["secure_survivors"])


def merge_secure_stats(seen: list[dict], bucket) -> dict:
    """One metrics line's secure fields from the stats of each bucket's sum (simulation and the
    deployed coordinator): the first bucket's sizes, survivors and server seconds summed, the
    slowest client's seconds."""
    out = {**seen[0], "secure_survivors": sum(e["secure_survivors"] for e in seen),
           "secure_server_s": round(sum(e["secure_server_s"] for e in seen), 4)}
    if "secure_client_s" in seen[0]:
        out["secure_client_s"] = max(e["secure_client_s"] for e in seen)
    if bucket:
        out["secure_buckets"] = len(seen)
    return out


def secure_step(algorithm, state, means: list[dict], ids: list[int], seed: int, cohort: int = 1):
    """The server step on secure sums' weighted ``means`` (one per bucket: ``{"delta": ...,
    "aux": ...}``), rows of weight one for the aggregator, with the round's
    server key (simulation and the deployed coordinator); ``ids``: one client of each bucket;
    ``cohort``: how many clients the sums hold. Attackers, in simulation, acted before they
    encoded."""
    if algorithm.adversary is not None:
        algorithm = dataclasses.replace(algorithm, adversary=None)
    one = torch.ones(len(means), dtype=next(iter(state.params.values())).dtype)
    aux = T.stack([m["aux"] for m in means]) if means[0]["aux"] else None
    return algorithm.server_round(state, T.stack([m["delta"] for m in means]), one, aux,
                                  key=rng.key(seed, state.round + 1, rng.SERVER, "server"),
                                  ids=ids, cohort=cohort)
