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

    from atoll.privacy import cli as privacy_cli

    privacy_cli.add_parser(sub)

    from atoll.deploy import cli as deploy_cli

    deploy_cli.register(sub)

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
    algorithm, model, data, plan = config.build(cfg)
    t0 = time.perf_counter()
    result = simulate(algorithm, model, data, plan, run_dir=run_dir, runtime=config.runtime(cfg),
                      resume=bool(args.resume), overwrite=args.overwrite,
                      progress=not args.quiet, config_text=config.dumps(cfg))
    _summary(cfg, result, time.perf_counter() - t0)
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
