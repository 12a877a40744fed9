"""The ``atoll`` command: run experiments, report on them, list data sets."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atoll", description="Federated learning with atoll.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an experiment described by a TOML file",
                         description="Run an experiment described by a TOML file.")
    run.add_argument("config", nargs="?", help="experiment TOML file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set algorithm.name=fedprox (repeatable)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    run.add_argument("--out", metavar="DIR", help="run folder (default: OUT_DIR/NAME, made unique); "
                     "must be empty or new")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in a non-empty --out folder (its run files are removed)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    rep = sub.add_parser("report", help="draw plots and a Markdown summary of a run",
                         description="Draw plots (accuracy and loss against rounds and bytes, "
                                     "per-client spread) and summary.md for a run folder.")
    rep.add_argument("run_dir")
    rep.set_defaults(func=_report)

    cmp_ = sub.add_parser("compare", help="overlay several runs in one plot and table",
                          description="Overlay several runs; table of rounds and bytes to a target accuracy.")
    cmp_.add_argument("run_dirs", nargs="+")
    cmp_.add_argument("--out", required=True, help="folder for compare.png and compare.md")
    cmp_.add_argument("--target", type=float, help="target test accuracy, e.g. 0.9")
    cmp_.add_argument("--labels", nargs="+", help="one label per run")
    cmp_.set_defaults(func=_compare)

    ds = sub.add_parser("datasets", help="list the built-in data sets",
                        description="List the built-in data sets (no download needed).")
    ds.set_defaults(func=_datasets)

    aud = sub.add_parser("audit", help="attack a run's own model: gradient leakage; check a watermark",
                         description="atoll audit leakage RUN_DIR: reconstruct test samples from "
                                     "batch-1 updates of the run's model, with no defence and "
                                     "under DP at several epsilons; writes leakage.json and leakage.png. "
                                     "atoll audit watermark RUN_DIR --model FILE: is FILE the run's "
                                     "watermarked model, and whose fingerprint does it carry?")
    aud.add_argument("what", choices=["leakage", "watermark"])
    aud.add_argument("run_dir")
    aud.add_argument("--samples", type=int, default=20)
    aud.add_argument("--iterative", action="store_true", help="also DLG and inverting gradients (slow)")
    aud.add_argument("--model", help="watermark: the suspect model's state dict (default RUN_DIR/model.pt)")
    aud.set_defaults(func=_audit)

    from atoll.privacy import cli as privacy_cli

    privacy_cli.add_parser(sub)

    from atoll.deploy import cli as deploy_cli

    deploy_cli.register(sub)
    from atoll.deploy import psi as psi_cli
    from atoll.deploy import vertical as vertical_cli

    psi_cli.register(sub)
    vertical_cli.register(sub)
    from atoll.deploy import he_cli

    he_cli.register(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from atoll.runtime.base import AllClientsFailed

    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"atoll {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except AllClientsFailed as exc:  # the run started but cannot train
        print(f"atoll {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _audit(args) -> int:
    import json

    import torch

    from atoll import config, leakage

    run_dir = Path(args.run_dir)
    cfg = config.load(run_dir / "config.toml")
    if args.what == "watermark":
        return _audit_watermark(cfg, Path(args.model or run_dir / "model.pt"), run_dir)
    _, model, data, _ = config.build(cfg)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    params = {k: v.detach() for k, v in model.named_parameters()}
    n = min(args.samples, len(data.y_test))
    result = leakage.audit(model, params, data.x_test[:n], data.y_test[:n], iterative=args.iterative,
                           prior=torch.cat([c.x for c in data.clients]).mean(0),
                           raw=None if data.x_mean is None else (data.x_mean, data.x_std))
    (run_dir / "leakage.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [r["epsilon"] for r in result["dp"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogx(eps, [r["psnr"] for r in result["dp"]], "o-", label="analytic attack under DP")
    ax.axhline(min(result["none"]["analytic_psnr"], 80), color="gray", ls="--", label="no defence (capped at 80)")
    ax.axhline(result["prior"]["psnr"], color="gray", ls=":", label="no update seen: the mean input")
    ax.set(xlabel="epsilon (one release, delta 1e-5)", ylabel="PSNR (dB)", title="gradient leakage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "leakage.png", dpi=120)
    none = result["none"]
    print(f"labels recovered {none['label_rate']:.0%}; analytic PSNR {none['analytic_psnr']:.1f} dB; "
          f"guessing the mean input {result['prior']['psnr']:.1f} dB; "
          + ", ".join(f"eps {r['epsilon']}: {r['psnr']:.1f} dB" for r in result["dp"]) + "; "
          + ", ".join(f"top-k {r['topk_fraction']:g}: {r['psnr']:.1f} dB" for r in result["compressed"])
          + "".join(f", secure sum of {r['clients']}: {r['psnr']:.1f} dB" for r in result["secure"]))
    return 0


def _audit_watermark(cfg, path: Path, run_dir: Path) -> int:
    """Trigger accuracy, binomial p-value and the best-matching client fingerprint of ``path``
    (checked against the codes the run recorded in ``fingerprints.json``, if it sent copies)."""
    from atoll import config
    from atoll import watermark as W

    key, w = W.load_key(cfg.watermark_key_file), cfg.watermark
    data = config.build_data(cfg)
    _, model, _, _ = config.build(cfg, data=data)  # data given: no watermark stage, no key written
    params = W.load_params(path, model)
    triggers = W.trigger_set(key, w.trigger_size, (data.n_features,), data.n_classes, w.scale,
                             next(model.parameters()).dtype)
    v = W.verify(model, params, triggers)
    fp = W.fingerprints(key, params, cfg.data.num_clients)
    sent = _recorded_fingerprints(run_dir, fp)
    t = W.trace(params, fp)
    print(f"watermark: trigger accuracy {v['trigger_accuracy']:.2%} ({v['hits']}/{v['triggers']}, "
          f"chance {v['chance']:.2%}), p = {v['p_value']:.3g}: "
          + ("OWNED (p <= 1e-6)" if v["owned"] else "not shown (p > 1e-6)"))
    print(f"fingerprint: best match client {t['client']} ({t['matches']}/{t['bits']} bits), "
          f"p = {t['p_value']:.3g} (Bonferroni over {cfg.data.num_clients} clients): "
          + ("TRACED" if t["traced"] else "not traced")
          + ("" if sent else " (this run sent no fingerprinted copies)"))
    return 0


def _recorded_fingerprints(run_dir: Path, fp) -> bool:
    """Whether the run sent fingerprinted copies (``fingerprints.json``), checked against the
    scheme rebuilt from the key (a mismatch is an error naming the field)."""
    import json

    from atoll import watermark as W

    path = run_dir / "fingerprints.json"
    if not path.exists():
        return False
    if path.stat().st_size > 2**24:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than a fingerprint record holds")
    try:
        W.check_record(json.loads(path.read_text()), fp)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return True


def _run(args) -> int:
    from atoll import config
    from atoll.simulation import simulate

    if args.resume:
        if args.config or args.out or args.overwrite:
            raise ValueError("--resume RUN_DIR continues that run: give no CONFIG, --out or --overwrite")
        run_dir = Path(args.resume)
        cfg = config.load(run_dir / "config.toml", args.set)
    elif args.config:
        cfg = config.load(args.config, args.set)
        run_dir = Path(args.out) if args.out else _unique(Path(cfg.out_dir) / cfg.name)
    else:
        raise ValueError("give a CONFIG file, or --resume RUN_DIR")
    if cfg.vertical is not None:
        return _run_vertical(cfg, run_dir, args)
    algorithm, model, data, plan = config.build(cfg)
    t0 = time.perf_counter()
    result = simulate(algorithm, model, data, plan, run_dir=run_dir, runtime=config.runtime(cfg),
                      resume=bool(args.resume), overwrite=args.overwrite,
                      progress=not args.quiet, config_text=config.dumps(cfg))
    _summary(cfg, result, time.perf_counter() - t0)
    return 0


def _run_vertical(cfg, run_dir: Path, args) -> int:
    from atoll import config
    from atoll.config.vertical import build
    from atoll.vertical.experiment import run

    settings, parties = build(cfg)
    t0 = time.perf_counter()
    f = run(settings, parties, run_dir, resume=bool(args.resume), overwrite=args.overwrite,
            config_text=config.dumps(cfg))
    auc = "n/a" if f["test_auc"] is None else f"{f['test_auc']:.3f}"
    print(f"atoll: {cfg.name} (vertical {settings['protocol']}, parties {[settings['name'], *settings['parties']]}): "
          f"{f['epochs']} epochs, {f['steps']} steps, {f['rows']} aligned rows; held-out AUC {auc}, "
          f"accuracy {f['test_acc']:.2%}, loss {f['test_loss']:.4f}; train loss {f['train_loss']:.4f}; "
          f"{f['bytes_per_step']:.0f} bytes per step; {time.perf_counter() - t0:.1f} s; run folder {run_dir}")
    return 0


def _unique(path: Path) -> Path:
    candidate, i = path, 1
    while candidate.exists():
        candidate, i = path.with_name(f"{path.name}-{i}"), i + 1
    return candidate


def _summary(cfg, result, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    f, m = result.final, result.metrics
    table = Table(title=f"atoll: {cfg.name} ({cfg.algorithm.name} on {cfg.data.name})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("rounds", str(f["rounds"]))
    table.add_row("test accuracy", f"{f['test_acc']:.2%}")
    table.add_row("test loss", f"{f['test_loss']:.4f}")
    if "fed_acc_mean" in f:
        table.add_row("client accuracy mean / p10 / min",
                      f"{f['fed_acc_mean']:.2%} / {f['fed_acc_p10']:.2%} / {f['fed_acc_min']:.2%}")
    if m:
        table.add_row("MB up / down", f"{m[-1]['bytes_up_cum'] / 1e6:.2f} / {m[-1]['bytes_down_cum'] / 1e6:.2f}")
    if "privacy" in f:
        p = f["privacy"]
        table.add_row(f"privacy ε (δ = {p['delta']:g}, {p['accountant']}, {p['mode']}, per {p['unit']})",
                      f"{p['epsilon']:.4g}")
        if p["stopped"]:
            table.add_row("stopped early", p["stopped"])
    table.add_row("wall time", f"{seconds:.1f} s")
    table.add_row("run folder", str(result.run_dir))
    Console().print(table)


def _report(args) -> int:
    from atoll.report import report

    out = report(args.run_dir)
    print(f"wrote {Path(args.run_dir) / 'summary.md'} and {len(out.get('plots', []))} plots")
    return 0


def _compare(args) -> int:
    from atoll.report import compare

    rows = compare(args.run_dirs, args.out, labels=args.labels, target_acc=args.target)
    print((Path(args.out) / "compare.md").read_text())
    return 0 if rows is not None else 1


def _datasets(args) -> int:
    from atoll.data import BUILTIN

    for name, desc in BUILTIN.items():
        print(f"{name:15s} {desc}")
    print("\nYour own data: data.name = \"path/to/file.csv\" (or .parquet / .npz) with data.label = COLUMN")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
