"""``[aggregator]``, ``[attack]`` and ``[secure]``: how the server combines the cohort's updates,
who attacks them (simulation) and the secure sum, each refusing the parts of a run that would
bypass or break it (docs/robustness.md, docs/secure-aggregation.md)."""
from __future__ import annotations

import logging
import math

from atoll.config.sections import AggregatorConfig, Config
from atoll.errors import ConfigError

log = logging.getLogger(__name__)
# the rules measured at chance with at most 20 % attackers (docs/robustness.md, 'Which rule'):
# the partitions where they fell (None: any), how far, and the fix; not warned behind nnm (which
# lifts all three) or bucket (the rule then sees bucket means)
_AT_CHANCE = {
    "median": (("dirichlet", "shards"), "0.34 under sign flip, on digits with 2 labels per client and 2 "
               "attackers of 12", "set aggregator.nnm = true (0.72 there) or use centered_clipping"),
    "trimmed_mean": (("dirichlet", "shards"), "0.17 under sign flip, on digits with 2 labels per client "
                     "and 2 attackers of 12", "set aggregator.nnm = true (0.72 there) or use centered_clipping"),
    "krum": (None, "0.09 under IPM with 1 attacker of 11 even on IID clients (the MNIST-shaped task), "
             "0.00 on label-skewed ones", "set aggregator.nnm = true (0.97 there) or use multi_krum")}


def with_secure(cfg: Config, algorithm, fed):
    """``[secure]``: the algorithm with a ``SecureSum``; refuses the parts that need what a
    secure sum hides (each client's row, its aux) or that would change the sum's meaning."""
    import dataclasses

    from atoll.secure.stage import SecureSum

    s, m = cfg.secure, cfg.secure.method
    why = []
    g = cfg.aggregator
    mixed = " and ".join(k for k in ("nnm", "arc") if getattr(g, k))  # they mix / clip single rows
    if mixed or (g.name != "mean" and not g.bucket):
        why.append(f"aggregator.name = {g.name!r}{' with ' + mixed if mixed else ''} needs each client's "
                   "update, which a secure sum hides (set aggregator.bucket = s to run the rule "
                   "over the means of securely summed buckets of s clients)")
    if g.bucket and (g.bucket < 2 or cfg.privacy.mode != "none"):
        why.append(f"aggregator.bucket = {g.bucket}: a secure bucket needs at least 2 clients, and "
                   "distributed noise is planned for the whole cohort, not per bucket")
    if algorithm.server_fn or (algorithm.aux_names() and algorithm.server_aux is None):
        why.append(f"algorithm {algorithm.name!r} reads each client's aux on its own in its server "
                   "step (an algorithm that reads only the aux mean, e.g. SCAFFOLD, sums it securely)")
    if not (algorithm.uplink.plain or algorithm.uplink.linear):
        why.append(f"comm.uplink = {algorithm.uplink.name!r} is not linear: the sum of its payloads "
                   "is not the payload of the sum (linear codecs: count_sketch, rand_k(f, masked))")
    if cfg.privacy.mode not in ("none", "distributed"):
        why.append(f"privacy.mode = {cfg.privacy.mode!r}: the server sees only the sum, so its noise "
                   "must come from the clients: use privacy.mode = \"distributed\"")
    if cfg.asynchronous.mode != "none":
        why.append("[async]: buffers of one client each have nothing to hide the client in")
    if why:
        raise ConfigError(f"secure.method = {m!r} cannot run with " + "; ".join(why))
    # over buckets every client counts one in its bucket's mean (unless secure.max_weight is set):
    # the robust rules weigh each client's row alike in plaintext, and a record count is the
    # client's own claim, so counting it would let one attacker outweigh its bucket's honest half
    max_weight = s.max_weight or (1.0 if g.bucket else float(max(c.n for c in fed.clients)))
    if m in ("ckks", "paillier"):  # homomorphic sum (atoll.secure.he); simulation only so far
        from atoll.secure.he import HomomorphicSum
        if s.dropout or s.neighbours is not None or g.bucket:
            raise ConfigError(f"secure.dropout / neighbours, aggregator.bucket are SecAgg+'s; "
                              f"method = {m!r} has none (its key holder decrypts one sum per round)")
        return dataclasses.replace(algorithm, secure=HomomorphicSum(
            m, max_weight, decryptors=s.decryptors, malicious=s.malicious))
    neighbours = s.neighbours if m == "secagg+" else None
    if m == "secagg+" and neighbours is None:
        neighbours = 20
    if m == "secagg" and s.neighbours is not None:
        raise ConfigError('secure.neighbours applies to method "secagg+" (secagg is the complete graph)')
    if s.threshold is not None and neighbours is not None and s.threshold > neighbours:
        raise ConfigError(f"secure.threshold = {s.threshold} exceeds secure.neighbours = {neighbours}")
    return dataclasses.replace(algorithm, secure=SecureSum(
        s.clip, max_weight, s.bits, neighbours, s.threshold, s.dropout, s.dropout_stage,
        bucket=g.bucket, malicious=s.malicious))


def build_aggregator(cfg: Config, server_update=None):
    """``[aggregator]`` -> an Aggregator; refuses rules that another part of the run would bypass.
    ``server_update(params, key) -> delta``: FLTrust's training on its root data (``build``)."""
    from atoll import aggregators as A

    g, a = cfg.aggregator, cfg.algorithm
    _check_trust(g, server_update)
    if g.name == "mean" and not (g.nnm or g.bucket or g.arc):
        return A.mean(a.weighting)
    where = {"algorithm.name": a.name if a.name in ("fednova", "scaffold", "fedagrac") else None,
             "privacy.mode": cfg.privacy.mode if cfg.privacy.mode == "dp_fedavg" else None,
             "async.mode": cfg.asynchronous.mode if cfg.asynchronous.mode != "none" else None,
             "algorithm.weighting": a.weighting if a.weighting != "samples" else None}
    for key, value in where.items():
        if value is not None:
            raise ConfigError(f"aggregator.name = {g.name!r} cannot be combined with {key} = {value!r}: "
                              "that part recomputes or reweighs the aggregate from the raw updates, "
                              "which would bypass the robust rule (use aggregator.name = 'mean')")

    # over secure buckets of s the median radius shrinks by sqrt(s): a bucket with one attacker
    # holds a whole attacker, its mean only half of one (mixing.centered_clipping; docs/robustness.md)
    secure_buckets = bool(g.bucket) and cfg.secure.method != "none"
    shrink = 1 / math.sqrt(g.bucket) if secure_buckets and g.tau == "median" else 1.0

    def rule(name):
        make = {"mean": lambda: A.mean("uniform"), "median": A.median, "trimmed_mean": lambda: A.trimmed_mean(g.f),
                "krum": lambda: A.krum(g.f), "multi_krum": lambda: A.multi_krum(g.f, g.m),
                "bulyan": lambda: A.bulyan(g.f),
                "geometric_median": lambda: A.geometric_median(iters=max(g.iters, 100)),
                "centered_clipping": lambda: A.centered_clipping(g.tau, g.iters, shrink),
                "fltrust": lambda: A.fltrust(server_update), "flame": lambda: A.flame(g.lam, cfg.seed)}
        if name == "norm_bound":
            if g.c is None:
                raise ConfigError('aggregator.name = "norm_bound" needs aggregator.c (the L2 bound, or "median")')
            if g.inner == "norm_bound" and g.name == "norm_bound":
                raise ConfigError('aggregator.inner = "norm_bound" is rlr\'s clipping; norm_bound\'s '
                                  "inner is a centre (mean, median, trimmed_mean, krum, multi_krum, "
                                  "geometric_median)")
            return A.norm_bound(g.c, rule("mean" if g.name == "rlr" else g.inner))
        if name == "rlr":
            return A.rlr(_theta(g, cfg), rule(g.inner))
        return make[name]()

    agg = rule(g.name)
    where, fell, fix = _AT_CHANCE.get(g.name, ((), "", ""))
    if not (g.nnm or g.bucket) and (where is None or cfg.data.partition in where):
        log.warning("aggregator.name = %r fell to %s (docs/robustness.md, 'Which rule'; data.partition "
                    "= %r here); %s", g.name, fell, cfg.data.partition, fix)
    if g.nnm:
        agg = A.nnm(g.f, agg)
    if g.bucket and cfg.secure.method == "none":  # under [secure] the buckets are secure sums
        agg = A.bucketing(g.bucket, agg, seed=cfg.seed)
    if g.arc:  # ARC clips the clients' own updates, before any mixing or bucketing
        agg = A.arc(_arc_f(g, cfg), agg)
    return agg


def _cohort(cfg: Config) -> int:
    """The updates a round's aggregator sees: the sampled clients, at most every client."""
    return min(cfg.data.num_clients, cfg.sampling.clients_per_round or cfg.data.num_clients)


def _arc_f(g: AggregatorConfig, cfg: Config) -> int:
    """``aggregator.f`` for ``arc = true``: fewer than a round's cohort (ARC clips the
    floor(2 (f/n) (n - f)) largest of n updates; none at f = 0, as with ``nnm``'s f = 0, which
    the benchmark's clean rows use)."""
    cohort = _cohort(cfg)
    if cohort and g.f >= cohort:
        raise ConfigError(f"aggregator.arc = true with aggregator.f = {g.f}: a round has "
                          f"{cohort} updates (data.num_clients, sampling.clients_per_round), ARC "
                          "needs more than f")
    return g.f


def _theta(g: AggregatorConfig, cfg: Config) -> int:
    """``aggregator.theta`` for rlr: set, and within the clients' number of sign votes."""
    if g.theta is None:
        raise ConfigError('aggregator.name = "rlr" needs aggregator.theta (the least |sum of the '
                          "clients' signs| that keeps a coordinate's sign; the paper: a little above "
                          "the number of attackers)")
    cohort = _cohort(cfg)
    if g.bucket:
        cohort = -(-cohort // g.bucket)  # rlr votes over the bucket means
    if g.theta > cohort:
        raise ConfigError(f"aggregator.theta = {g.theta} exceeds the {cohort} sign votes of a round "
                          f"(data.num_clients = {cfg.data.num_clients}"
                          f"{f', aggregator.bucket = {g.bucket}' if g.bucket else ''}): every "
                          "coordinate would be flipped")
    return g.theta


def _check_trust(g: AggregatorConfig, server_update) -> None:
    if g.name in ("fltrust", "flame") and (g.nnm or g.bucket or g.arc):
        raise ConfigError(f"aggregator.name = {g.name!r} chooses whom to trust from the raw updates: "
                          "it cannot run after aggregator.nnm, aggregator.bucket or aggregator.arc")
    if g.theta is not None and g.name != "rlr":
        raise ConfigError(f"aggregator.theta = {g.theta} is rlr's threshold; aggregator.name = "
                          f"{g.name!r} does not use it")
    if g.root and g.name != "fltrust":
        raise ConfigError(f"aggregator.root = {g.root} is FLTrust's root data; aggregator.name = "
                          f"{g.name!r} does not use it")
    if g.name == "fltrust" and (not g.root or server_update is None):
        raise ConfigError('aggregator.name = "fltrust" needs root data: set aggregator.root to the '
                          "number of clean samples the server trains on (the paper uses 100), in a "
                          "simulation that loads [data]")


def fltrust_update(cfg: Config, model, local, fed):
    """FLTrust's ``server_update`` on ``aggregator.root`` clean training samples (before any
    data attack; ``algorithms.root``); a deployed client's stand-in data has none to give."""
    from atoll.algorithms.root import root_update

    g, c = cfg.aggregator, cfg.client
    if not g.root or not fed.clients or getattr(fed.clients[0], "x", None) is None:
        def no_root(params, key):
            raise RuntimeError("fltrust: the server update runs where the root data is (the server)")
        return no_root if g.root else None
    try:
        return root_update(model, local, fed.clients, g.root, cfg.seed, c.batch_size, c.steps, c.epochs)
    except ValueError as exc:
        raise ConfigError(f"aggregator.root = {g.root}: {exc}") from None


def with_attack(cfg: Config, algorithm, fed):
    """``[attack]``: the adversary beside the aggregator, and the attackers' poisoned data."""
    import dataclasses

    from atoll import attacks

    t, n = cfg.attack, len(fed.clients)
    ids = t.clients if t.clients is not None else list(range(t.count))
    if not ids or any(not 0 <= i < n for i in ids):
        raise ConfigError(f"attack: attackers {ids} must be a non-empty list of client ids in [0, {n}) "
                          "(attack.clients, or attack.count > 0)")
    if t.target >= fed.n_classes:
        raise ConfigError(f"attack.target = {t.target} is not a class (the data has {fed.n_classes})")
    adv = attacks.Adversary(t.name, frozenset(ids), t.start_round, t.scale, t.sigma, t.eps)
    fed = attacks.poison(fed, adv, fed.n_classes, t.target, t.fraction)
    return dataclasses.replace(algorithm, adversary=adv), fed
