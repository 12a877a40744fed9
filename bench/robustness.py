"""Robustness: worst-case test accuracy over attacks, per aggregator, heterogeneity and f.

    PYTHONPATH=src python bench/robustness.py                       # the full table (long)
    PYTHONPATH=src python bench/robustness.py --data digits --split dir0.1 --f 2 \
        --rules nnm+trimmed_mean,median --rounds 30              # one cell family
    PYTHONPATH=src python bench/robustness.py --backdoor --data digits --split iid --f 2 \
        --rules mean,flame --seeds 0,1,2                          # backdoor success, clean accuracy

After ByzFL (Allouah et al.): 10 honest clients plus f Byzantine ones (ids 10..10+f-1), all
taking part in every round; each cell is the worst test accuracy (final round) over the
attacks. Whose data: ``--attackers byzfl`` (the default since 2026-12-06) is ByzFL's own
protocol, the split over the 10 honest clients only, each attacker an IID draw from their pooled
data (``federation``); ``--attackers share`` (every table before 2026-12-06 10:00Z) splits the
data over all 10 + f clients, so the attackers hold shares of it. Honest clients run local SGD
steps and send their update; attackers' rows are replaced by ``atoll.attacks`` (label flip
trains on flipped labels instead). Splits: ``iid``,
``dir1`` / ``dir0.1`` (Dirichlet alpha over labels), ``2labels`` (two label shards per client).
Data: ``digits`` (scikit-learn) and ``mnistlike`` (784 features, 10 classes, generated).
Rules named ``secure ...`` run under ``[secure] method = "secagg"`` (clip 1.0, 16 bits): the
robust rule sees only the means of securely summed random buckets of 2 clients;
``--secure-buckets 2,3`` adds, for every rule R of ``--rules``, ``secure(s=2) R`` and
``secure(s=3) R`` (R over the means of secure buckets of s) and prints each next to plaintext R.
``rlr(theta=T)`` is the robust learning rate over the mean, ``rlr(theta=T)+INNER`` over INNER
(``median``, ``multi_krum``, ... or ``norm_bound(median)``: the paper's RLR with clipping).
``--secure-sum plain`` (bench only) replaces the SecAgg protocol by the plain integer sum of
the very same encoded inputs (``PlainSum``: the protocol's unmasked sum, bit for bit, without
its key agreement and masks); tests/secure/test_bucket_bench.py checks the two runs agree.
Prints a Markdown table per data set and writes bench/out/robustness.json (``--out`` another
file: a partial run then leaves the committed figures alone), rewritten after every row.
``--seeds 0,1,2``: every row per seed (split, initial model, batches, the attackers' noise, the
buckets); with several, the secure cells' worst over seeds. ``--attacks ""``: only the clean runs
(rows without attacks, for ``--merge``). ``--versus RULE``: each secure cell against plaintext
RULE instead of its own rule. ``--secure-max-weight 0``: secure bucket means weighted by record
count, as before 2026-12-06 (default with buckets: every client counts one).
``centered_clipping(tau=X)``: any radius, ``X = median`` too (iters 3)."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from atoll import attacks, config
from atoll.runtime.vmap import VmapRuntime
from atoll.secure.stage import SecureSum
from atoll.simulation import simulate

ATTACKS = ["sign_flip", "gaussian", "scaled", "alie", "ipm", "min_max", "min_sum", "label_flip"]
SPLITS = {"iid": "partition = 'iid'", "dir1": "partition = 'dirichlet'\nalpha = 1.0",
          "dir0.1": "partition = 'dirichlet'\nalpha = 0.1",
          "2labels": "partition = 'shards'\nshards_per_client = 2"}
RULES = {"mean": "name = 'mean'", "median": "name = 'median'",
         "trimmed_mean": "name = 'trimmed_mean'", "krum": "name = 'krum'",
         "multi_krum": "name = 'multi_krum'", "geometric_median": "name = 'geometric_median'",
         "centered_clipping": "name = 'centered_clipping'\ntau = 1.0\niters = 3",
         "nnm+trimmed_mean": "name = 'trimmed_mean'\nnnm = true",
         "nnm+median": "name = 'median'\nnnm = true", "nnm+krum": "name = 'krum'\nnnm = true",
         "centered_clipping(tau=0.3)": "name = 'centered_clipping'\ntau = 0.3\niters = 3",
         "centered_clipping(config defaults)": "name = 'centered_clipping'",  # tau 10, iters 1
         "centered_clipping(tau=0.1)": "name = 'centered_clipping'\ntau = 0.1\niters = 3",
         "nnm+centered_clipping": "name = 'centered_clipping'\ntau = 1.0\niters = 3\nnnm = true",
         "bucketing+median": "name = 'median'\nbucket = 2",
         "bucketing+centered_clipping": "name = 'centered_clipping'\ntau = 1.0\niters = 3\nbucket = 2",
         # under [secure]: the same rules over the means of securely summed buckets of 2
         "secure bucketing+median": "name = 'median'\nbucket = 2",
         "secure bucketing+centered_clipping":
             "name = 'centered_clipping'\ntau = 1.0\niters = 3\nbucket = 2",
         "fltrust": "name = 'fltrust'\nroot = 100", "flame": "name = 'flame'",
         "flame(lam=0.01)": "name = 'flame'\nlam = 0.01",
         "norm_bound(median)": "name = 'norm_bound'\nc = 'median'",
         "norm_bound(median)+multi_krum": "name = 'norm_bound'\nc = 'median'\ninner = 'multi_krum'",
         # ARC (adaptive robust clipping of the clients' updates) before the rule
         "arc+trimmed_mean": "name = 'trimmed_mean'\narc = true",
         "arc+nnm+trimmed_mean": "name = 'trimmed_mean'\nnnm = true\narc = true",
         "arc+centered_clipping(tau=0.3)": "name = 'centered_clipping'\ntau = 0.3\niters = 3\narc = true",
         "arc+nnm+centered_clipping(tau=0.3)":
             "name = 'centered_clipping'\ntau = 0.3\niters = 3\nnnm = true\narc = true"}
HONEST = 10
SECURE = "[secure]\nmethod = 'secagg'\nclip = 1.0\nbits = 16\n"


class PlainSum(SecureSum):
    """Bench only: the secure sum's server half without the protocol. The clients' encoded
    inputs (clamped, weighed, stochastically rounded: ``SecureSum.encode``) are added in the
    protocol's ring and decoded by ``SecureSum.mean``, which the SecAgg run's unmasked sum equals
    bit for bit when nobody drops out (tests/secure/test_secagg.py, test_bucket_bench.py)."""

    def aggregate(self, inputs, round_, like):
        setup = self.setup(sorted(inputs), round_, len(next(iter(inputs.values()))))
        total = sum(self.ring(v, setup) for v in inputs.values()) & np.uint64((1 << setup.bits) - 1)
        stats = {"secure_survivors": len(inputs), "secure_bits": setup.bits, "secure_server_s": 0.0}
        return self.mean(total, setup, like, len(inputs)), stats


def rule_text(rule):
    """The ``[aggregator]`` lines of ``rule``: RULES' entry, or for ``secure(s=S) R`` the entry
    of R with ``bucket = S`` (run under ``[secure]``)."""
    if rule.startswith("secure(s="):
        s, inner = rule[len("secure(s="):].split(") ", 1)
        return f"{rule_text(inner)}\nbucket = {int(s)}"
    if rule.startswith("rlr(theta="):  # rlr(theta=T), or rlr(theta=T)+INNER (median, norm_bound(median))
        theta, _, inner = rule[len("rlr(theta="):].partition(")")
        inner = inner.removeprefix("+") or "mean"
        inner = "'norm_bound'\nc = 'median'" if inner == "norm_bound(median)" else repr(inner)
        return f"name = 'rlr'\ntheta = {int(theta)}\ninner = {inner}"
    if rule not in RULES and rule.startswith("centered_clipping(tau="):  # any tau, iters 3
        tau = rule[len("centered_clipping(tau="):-1]
        return f"name = 'centered_clipping'\ntau = {repr(tau) if tau == 'median' else float(tau)}\niters = 3"
    return RULES[rule]


def config_text(split, rule, f, attack, rounds, seed, momentum=0.0):
    """The run's config: 10 + f clients, the last f attacking with ``attack`` (None: the same
    split and rule, nobody attacks)."""
    comm = f"[comm]\nuplink = 'worker_momentum({momentum})'\n" if momentum else ""
    secure = SECURE if rule.startswith("secure") else ""
    attack_part = (f"[attack]\nname = '{attack}'\nclients = {list(range(HONEST, HONEST + f))}\n"
                   if f and attack else "")
    return f"""
seed = {seed}
rounds = {rounds}
[data]
name = "digits"
num_clients = {HONEST + f}
{SPLITS[split]}
client_test_fraction = 0.0
[model]
name = "mlp"
hidden = [64]
[client]
lr = 0.05
batch_size = 32
steps = 5
[algorithm]
name = "fedavgm"
server_momentum = 0.9
server_lr = 0.5
[aggregator]
{rule_text(rule)}
f = {f}
[eval]
federated = false
every = {rounds}
{comm}{secure}{attack_part}"""


def federation(name, text, f, seed, attackers="byzfl"):
    """The clients' data. ``share``: the data split over all 10 + f clients, attackers included
    (at extreme heterogeneity an attacker may then be the only holder of a class, which no rule
    that leaves it out recovers). ``byzfl``: ByzFL's protocol (its ``DataDistributor`` splits the
    data over the honest clients only; its attackers hold none and build their vectors from the
    honest ones, e.g. sign flip = minus the honest mean): the split over the 10 honest clients,
    and each attacker an IID sample (its own draw, without replacement) of their pooled data, of
    an average honest client's size, so that its honest update estimates the honest mean."""
    if attackers not in ("share", "byzfl"):
        raise ValueError(f"attackers must be 'share' or 'byzfl', not {attackers!r}")
    n = HONEST + f if attackers == "share" else HONEST
    fed = config.build_data(config.load(text=text, overrides=[f"data.num_clients={n}", f"data.name={name}"]))
    if attackers == "share":
        return fed
    x, y = torch.cat([c.x for c in fed.clients]), torch.cat([c.y for c in fed.clients])
    size, g = round(len(y) / HONEST), torch.Generator().manual_seed(seed)
    honest = fed.clients[0]
    extra = [dataclasses.replace(honest, x=x[i], y=y[i])
             for i in (torch.randperm(len(y), generator=g)[:size] for _ in range(f))]
    return dataclasses.replace(fed, clients=fed.clients + extra)


def one(name, split, rule, f, attack, rounds, seed=0, momentum=0.0, server_momentum=0.9,
        server_lr=0.5, backdoor=False, boost=10.0, only_honest=False, plain_sum=False,
        max_weight=None, attackers="byzfl"):
    """Final test accuracy (and with ``backdoor``, the trigger's success rate).
    ``only_honest``: the attackers' clients are left out of the run (their data unused);
    ``plain_sum``: a secure rule's sums by ``PlainSum`` instead of the SecAgg protocol;
    ``attackers``: where the attackers' data comes from (:func:`federation`)."""
    text = config_text(split, rule, f, attack, rounds, seed, momentum)
    cfg = config.load(text=text, overrides=[f"algorithm.server_momentum={server_momentum}",
                                            f"algorithm.server_lr={server_lr}",
                                            *([f"secure.max_weight={max_weight}"] if max_weight else []),
                                            *([f"attack.scale={boost}"] if attack == "backdoor" else [])])
    alg, model, fed, plan = config.build(cfg, data=federation(name, text, f, seed, attackers))
    if max_weight == 0 and alg.secure is not None:  # weights by record count (before 2026-12-06)
        alg = dataclasses.replace(alg, secure=dataclasses.replace(
            alg.secure, max_weight=float(max(c.n for c in fed.clients))))
    if plain_sum and alg.secure is not None:
        alg = dataclasses.replace(alg, secure=PlainSum(**vars(alg.secure)))
    if only_honest:
        fed = dataclasses.replace(fed, clients=fed.clients[:HONEST])
    high = float(max(c.x.max() for c in fed.clients if c.n))  # the trigger's value (attacks.poison)
    res = simulate(alg, model, fed, plan, runtime=VmapRuntime(), plots=False)
    if not backdoor:
        return float(res.final["test_acc"])
    model_fn = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
    hit = attacks.backdoor_success(model_fn, res.state.params, fed.x_test, fed.y_test, 0, high)
    return float(res.final["test_acc"]), hit


def backdoor_table(a):
    """Model-replacement backdoor (f attackers among 10 + f clients, update boosted ``--boost``),
    per seed: the reference (FedAvg, the same 10 + f clients, nobody attacks), the ceiling of a
    rule that drops the attackers (FedAvg over the 10 honest clients of that split), and per rule
    its clean accuracy (same clients, no attack), its accuracy and trigger success under the
    backdoor, and "down" = reference - accuracy under the backdoor, in points."""
    out, rows = Path(a.out), []
    out.parent.mkdir(parents=True, exist_ok=True)
    print("\n| data | split | seed | rule | reference | honest only | rule clean | acc under backdoor "
          "| success | down (points) |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, split, f, seed in itertools.product(a.data.split(","), a.split.split(","),
                                                  map(int, a.f.split(",")), map(int, a.seeds.split(","))):
        server = dict(server_momentum=a.server_momentum, server_lr=a.server_lr, attackers=a.attackers)
        ref = one(name, split, "mean", f, None, a.rounds, seed, **server)
        honest = one(name, split, "mean", f, None, a.rounds, seed, only_honest=True, **server)
        for rule in a.rules.split(","):
            clean = one(name, split, rule, f, None, a.rounds, seed, **server)
            acc, hit = one(name, split, rule, f, "backdoor", a.rounds, seed, backdoor=True, boost=a.boost,
                           **server)
            rows.append(dict(data=name, split=split, f=f, seed=seed, rule=rule, boost=a.boost, **server,
                             reference=ref, honest_only=honest, clean=clean, acc=acc, success=hit))
            print(f"| {name} | {split} (f={f}) | {seed} | {rule} | {ref:.3f} | {honest:.3f} | {clean:.3f} "
                  f"| {acc:.3f} | {hit:.3f} | {100 * (ref - acc):+.1f} |", flush=True)
            out.write_text(json.dumps(rows, indent=1))
    print("\n| rule | success (mean, max over seeds) | down, points (mean, max) | seeds meeting both |")
    print("|---|---|---|---|")
    for rule in a.rules.split(","):
        rs = [r for r in rows if r["rule"] == rule]
        hits, downs = [r["success"] for r in rs], [100 * (r["reference"] - r["acc"]) for r in rs]
        ok = sum(h <= 0.05 and d <= 1.0 for h, d in zip(hits, downs))
        print(f"| {rule} | {sum(hits) / len(rs):.3f}, {max(hits):.3f} | {sum(downs) / len(rs):+.1f}, "
              f"{max(downs):+.1f} | {ok} of {len(rs)} |")


def arguments(argv=None):
    """The command line (``argv``, default ``sys.argv``), with its defaults: what ``main`` and the
    tests run the bench with."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits,mnistlike")
    ap.add_argument("--split", default=",".join(SPLITS))
    ap.add_argument("--f", default="1,2,3,4")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--momentum", type=float, default=0.0, help="worker momentum (0: off)")
    ap.add_argument("--server-momentum", type=float, default=0.9)
    ap.add_argument("--server-lr", type=float, default=0.5)
    ap.add_argument("--backdoor", action="store_true", help="the backdoor table instead")
    ap.add_argument("--seeds", default="0", help="the seeds (split, init, batches, attackers' "
                    "noise, buckets): rows per seed")
    ap.add_argument("--boost", type=float, default=10.0, help="--backdoor: the attackers' boost")
    ap.add_argument("--out", default=None, help="the JSON rows (default bench/out/robustness.json, "
                    "with --backdoor bench/out/robustness_backdoor.json)")
    ap.add_argument("--secure-buckets", default="", help="bucket sizes s: each rule also over "
                    "secure buckets of s (rows 'secure(s=S) RULE')")
    ap.add_argument("--secure-sum", choices=["secagg", "plain"], default="secagg",
                    help="plain: PlainSum, the protocol's sum without its masks (bench only)")
    ap.add_argument("--secure-only", action="store_true", help="with --secure-buckets: only "
                    "the secure rows (the plaintext ones from another run, --merge)")
    ap.add_argument("--secure-max-weight", type=float, default=None,
                    help="secure.max_weight for the secure rules (default with buckets: 1, one vote per "
                    "client in its bucket; 0: the largest record count, each client weighs its count)")
    ap.add_argument("--attackers", choices=["share", "byzfl"], default="byzfl",
                    help="the attackers' data: byzfl (ByzFL's protocol, the default: the split over the "
                    "10 honest clients, each attacker an IID sample of their data) or share (the split "
                    "over all 10 + f clients)")
    ap.add_argument("--no-clean", action="store_true", help="skip the runs without attackers")
    ap.add_argument("--versus", default=None, help="the plaintext rule each secure cell is compared "
                    "with (default: its own rule R; with --merge, its rows must be in the merged files)")
    ap.add_argument("--merge", default="", help="JSON files of earlier runs (other --attacks): "
                    "print and write (--out) their rows merged, running nothing")
    return ap.parse_args(argv)


def main(argv=None):
    a = arguments(argv)
    a.out = a.out or str(Path(__file__).parent / "out" / ("robustness_backdoor.json" if a.backdoor
                                                          else "robustness.json"))
    if a.backdoor:
        return backdoor_table(a)
    rules = [] if a.secure_only else a.rules.split(",")
    rules += [f"secure(s={s}) {r}" for s in map(int, filter(None, a.secure_buckets.split(",")))
              for r in a.rules.split(",")]
    results = ([r for r in merge(a.merge.split(",")) if r["rule"] in rules + [a.versus] and r["data"] in a.data
                and r["split"] in a.split.split(",") and str(r["f"]) in a.f.split(",")
                and str(r["seed"]) in a.seeds.split(",")
                and r.get("attackers", "share") == a.attackers and r.get("momentum", 0.0) == a.momentum]
               if a.merge else grid(a, rules, Path(a.out)))
    if a.merge:
        Path(a.out).write_text(json.dumps(results, indent=1))
    print_tables(a, rules, results)


def merge(files):
    """The rows of several runs' JSON files (the same cells, other ``--attacks``) as one: per
    (data, split, f, rule, seed), every attack's accuracy and the worst over all of them."""
    rows = {}
    for fn in files:
        for r in json.loads(Path(fn).read_text()):
            r.setdefault("seed", 0)  # rows written before --seeds ran seed 0
            key = (r["data"], r["split"], r["f"], r["rule"], r["seed"], r.get("attackers", "share"),
                   r.get("momentum", 0.0))
            row = rows.setdefault(key, {**r, "all": {}, "seconds": 0.0})
            if "error" in r:
                continue
            row["all"].update(r["all"])
            row["seconds"] = round(row["seconds"] + r["seconds"], 1)
            row["clean"] = row["clean"] if row["clean"] is not None else r["clean"]
            if not row["all"]:
                continue
            row["worst_attack"] = min(row["all"], key=row["all"].get)
            row["worst"] = row["all"][row["worst_attack"]]
    return list(rows.values())


def worst_case(a, name, split, rule, f, clean, seed=0):
    """One row: ``rule``'s accuracy under every attack and the worst; a rule that cannot run on
    so few rows (over buckets: n buckets < its bound) is a row with ``"error"`` instead.
    ``--attacks ""``: a row with only ``clean`` (merged with the attack rows by ``--merge``)."""
    t0, accs = time.time(), {}
    row = {"data": name, "split": split, "f": f, "rule": rule, "seed": seed, "clean": clean,
           **({"attackers": a.attackers} if a.attackers != "share" else {}),
           **({"momentum": a.momentum} if a.momentum else {})}
    for attack in filter(None, a.attacks.split(",")):
        try:
            accs[attack] = one(name, split, rule, f, attack, a.rounds, seed, a.momentum,
                               a.server_momentum, a.server_lr, plain_sum=a.secure_sum == "plain",
                               max_weight=a.secure_max_weight, attackers=a.attackers)
        except ValueError as exc:
            return {**row, "error": str(exc)}
    worst = {"worst_attack": min(accs, key=accs.get)} if accs else {}
    return {**row, **({"worst": accs[worst["worst_attack"]], **worst} if accs else {}),
            "all": accs, "seconds": round(time.time() - t0, 1)}


def grid(a, rules, out):
    """Every (data, split, f, rule) row, written to ``out`` after each."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for seed, name, split in itertools.product(map(int, a.seeds.split(",")), a.data.split(","),
                                               a.split.split(",")):
        clean = {r: None if a.no_clean else one(name, split, r, 0, None, a.rounds, seed, a.momentum,
                                                 a.server_momentum, a.server_lr,
                                                 plain_sum=a.secure_sum == "plain",
                                                 max_weight=a.secure_max_weight, attackers=a.attackers)
                 for r in rules}
        for f, rule in itertools.product(map(int, a.f.split(",")), rules):
            results.append(worst_case(a, name, split, rule, f, clean[rule], seed))
            print(json.dumps(results[-1]), flush=True)
            out.write_text(json.dumps(results, indent=1))
    return results


def print_tables(a, rules, results):
    """Per seed, the worst-case table per data set and, with ``--secure-buckets``, each secure
    cell next to its plaintext rule's (worst and clean) and the difference in points; with
    several seeds, then each secure cell's worst over seeds next to plaintext's."""
    n = len(a.attacks.split(","))
    show = lambda r: (f"{r['worst']:.2f} ({r['worst_attack']})"  # noqa: E731
                      + (f" [{len(r['all'])} of {n}]" if len(r["all"]) < n else "") if "worst" in r
                      else "n/a (" + r["error"].split(":")[0] + ")" if "error" in r else "-")
    num = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    seeds = sorted({r["seed"] for r in results})
    for seed in seeds:
        at = [r for r in results if r["seed"] == seed]
        fs = sorted({r["f"] for r in at})
        for name in a.data.split(","):
            print(f"\n### {name}, seed {seed}: worst-case accuracy over {n} attacks (clean in brackets)\n")
            print("| split | rule | " + " | ".join(f"f={f}" for f in fs) + " |")
            print("|---|---|" + "---|" * len(fs))
            for split, rule in itertools.product(a.split.split(","), rules):
                cells = {r["f"]: r for r in at if (r["data"], r["split"], r["rule"]) == (name, split, rule)}
                clean = next(iter(cells.values()))["clean"] if cells else None
                clean = float("nan") if clean is None else clean
                print(f"| {split} | {rule} [{clean:.2f}] | " + " | ".join(
                    show(cells.get(f, {})) for f in fs) + " |")
        secure = [r for r in at if r["rule"].startswith("secure(s=")]
        if secure:
            print(f"\nseed {seed}:\n\n| data | split | f | rule | s | plaintext worst | secure buckets worst "
                  "| points (over the attacks both ran) | clean: plaintext, secure, points |")
            print("|---|---|---|---|---|---|---|---|---|")
        for r in secure:
            s, inner = r["rule"][len("secure(s="):].split(") ", 1)
            p = plaintext_of(r, at, a.versus)
            both = set(r.get("all", {})) & set(p.get("all", {}))
            diff = (f"{100 * (min(r['all'][k] for k in both) - min(p['all'][k] for k in both)):+.1f}"
                    + (f" ({len(both)})" if len(both) < n else "") if both else "")
            clean = (f"{num(p.get('clean'))}, {num(r['clean'])}" + (
                f", {100 * (r['clean'] - p['clean']):+.1f}" if None not in (r["clean"], p.get("clean")) else ""))
            print(f"| {r['data']} | {r['split']} | {r['f']} | {inner} | {s} | {show(p)} | {show(r)} | {diff} "
                  f"| {clean} |")
    if len(seeds) > 1 and any(r["rule"].startswith("secure(s=") for r in results):
        over_seeds(results, n, a.versus)


def plaintext_of(r, results, versus=None):
    """The plaintext row of the secure row ``r`` (same data, split, f and seed): its own rule's,
    or ``versus``'s (``--versus``)."""
    inner = versus or r["rule"].split(") ", 1)[1]
    return next((q for q in results if (q["data"], q["split"], q["f"], q["rule"], q["seed"]) ==
                 (r["data"], r["split"], r["f"], inner, r["seed"])), {"error": "not run"})


def over_seeds(results, n, versus=None):
    """Per secure cell: the worst over seeds and attacks of the secure rule and of plaintext,
    the difference in points, the per-seed differences, and the lowest clean accuracy."""
    print("\n| data | split | f | rule | s | seeds | plaintext worst (seed) | secure worst (seed) | points "
          "| points per seed | clean, lowest: plaintext, secure, points |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cells = {}
    for r in results:
        if r["rule"].startswith("secure(s=") and "worst" in r:
            cells.setdefault((r["data"], r["split"], r["f"], r["rule"]), []).append(r)
    for (name, split, f, rule), rs in cells.items():
        s, inner = rule[len("secure(s="):].split(") ", 1)
        ps = [p for p in map(lambda r: plaintext_of(r, results, versus), rs) if "worst" in p]
        if len(ps) < len(rs):
            continue
        low = lambda rows: min(rows, key=lambda r: r["worst"])  # noqa: E731
        mark = lambda rows: "".join(f" [seed {r['seed']}: {len(r['all'])} of {n}]"  # noqa: E731
                                    for r in rows if len(r["all"]) < n)
        per = ", ".join(f"{100 * (r['worst'] - p['worst']):+.1f}" for r, p in zip(rs, ps))
        cl = [min((x["clean"] for x in rows if x["clean"] is not None), default=None) for rows in (ps, rs)]
        clean = "-" if None in cl else f"{cl[0]:.3f}, {cl[1]:.3f}, {100 * (cl[1] - cl[0]):+.1f}"
        lp, lr = low(ps), low(rs)
        print(f"| {name} | {split} | {f} | {inner} | {s} | {','.join(str(r['seed']) for r in rs)} "
              f"| {lp['worst']:.3f} ({lp['worst_attack']}, {lp['seed']}){mark(ps)} "
              f"| {lr['worst']:.3f} ({lr['worst_attack']}, {lr['seed']}){mark(rs)} "
              f"| {100 * (lr['worst'] - lp['worst']):+.1f} | {per} | {clean} |")


if __name__ == "__main__":
    main()
