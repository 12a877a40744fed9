"""``atoll privacy epsilon|noise|steps``: DP-SGD budget arithmetic from the command line.

Registered by ``atoll.cli`` with ``add_parser(subparsers)``; ``run(args)`` prints a table.

    atoll privacy epsilon --batch 256 --records 60000 --noise 1.1 --epochs 60 --delta 1e-5
    atoll privacy noise   --q 0.01 --steps 10000 --epsilon 1.0
    atoll privacy steps   --q 0.01 --noise 4 --epsilon 1.0

The sampling rate is ``--q`` or ``--batch / --records``; the length is ``--steps`` or
``--epochs``, counted as runs count it: ``ceil(epochs / q)`` steps (TF-Privacy's
``compute_dp_sgd_privacy`` floors ``epochs * records / batch``; pass ``--steps`` to match it).
A noise multiplier is printed rounded *up* (so the printed value itself meets the target).
"""
from __future__ import annotations

import argparse
import math

from atoll.privacy import KINDS


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``privacy`` command (with ``epsilon``, ``noise`` and ``steps``) to ``subparsers``."""
    p = subparsers.add_parser("privacy", help="privacy budget: epsilon, noise or steps",
                              description="DP-SGD privacy budget arithmetic (dp-accounting).")
    sub = p.add_subparsers(dest="privacy_command", required=True, metavar="WHAT")
    eps = sub.add_parser("epsilon", help="epsilon after a run, under each accountant")
    _rate(eps), _length(eps), _noise(eps)
    noise = sub.add_parser("noise", help="smallest noise multiplier within a target epsilon")
    _rate(noise), _length(noise), _target(noise)
    steps = sub.add_parser("steps", help="most steps within a target epsilon")
    _rate(steps), _noise(steps), _target(steps)
    steps.add_argument("--max-steps", type=int, default=10**6,
                       help="search no further than this many steps (default 1e6)")
    for q in (eps, noise, steps):
        q.add_argument("--delta", type=float, default=1e-5, help="target delta, in (0, 1) (default 1e-5)")
        q.add_argument("--neighboring", choices=("add_remove", "replace_one"), default="add_remove",
                       help="neighbouring datasets differ by adding/removing one record (default) "
                            "or by replacing one (sensitivity twice the clip)")
        q.add_argument("--accountant", choices=("all",) + KINDS, default="all" if q is eps else "pld")
        q.set_defaults(func=run)
    return p


def _rate(p):
    p.add_argument("--q", type=float, help="Poisson sampling rate")
    p.add_argument("--batch", type=int, help="expected batch size (with --records)")
    p.add_argument("--records", type=int, help="number of records (with --batch)")


def _length(p):
    p.add_argument("--steps", type=int, help="number of steps")
    p.add_argument("--epochs", type=float, help="number of epochs")


def _noise(p):
    p.add_argument("--noise", type=float, required=True, help="noise multiplier (std / clip)")


def _target(p):
    p.add_argument("--epsilon", type=float, required=True, help="target epsilon")


def sampling_rate(args) -> float:
    if args.q is not None:
        q = args.q
    elif args.batch and args.records:
        q = args.batch / args.records
    else:
        raise ValueError("give --q, or --batch and --records")
    if not 0 < q <= 1:
        raise ValueError(f"the sampling rate must be in (0, 1], got {q:g}")
    return q


def num_steps(args) -> int:
    from atoll.privacy.calibrate import steps_for_epochs

    if getattr(args, "steps", None) is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        return args.steps
    if getattr(args, "epochs", None) is not None:
        return steps_for_epochs(args.epochs, sampling_rate(args))
    raise ValueError("give --steps or --epochs")


def round_up(x: float, digits: int = 6) -> float:
    """``x`` rounded up to ``digits`` significant digits (never below ``x``)."""
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale * (1 - 1e-15)) / scale


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from atoll.privacy import calibrate

    from atoll.privacy.accountant import check_delta

    q = sampling_rate(args)
    check_delta(args.delta)
    rel = args.neighboring
    kinds = KINDS if args.accountant == "all" else (args.accountant,)
    table = Table(title=f"atoll privacy {args.privacy_command} (q={q:.6g}, delta={args.delta:g}, "
                        f"{rel.replace('_', '/')} neighbouring)")
    if args.privacy_command == "epsilon":
        t = num_steps(args)
        eps = calibrate.privacy_table(q, args.noise, t, args.delta, kinds, rel)
        table.add_column("accountant"), table.add_column("steps"), table.add_column("noise")
        table.add_column("epsilon")
        for k, e in eps.items():
            table.add_row(k, str(t), f"{args.noise:g}", f"{e:.4f}")
    elif args.privacy_command == "noise":
        t = num_steps(args)
        table.add_column("accountant"), table.add_column("steps"), table.add_column("noise multiplier")
        for k in kinds:
            z = round_up(calibrate.noise_for_epsilon(args.epsilon, q, t, args.delta, k, neighboring=rel))
            table.add_row(k, str(t), f"{z:.6g}")
    else:
        table.add_column("accountant"), table.add_column("noise"), table.add_column("steps")
        for k in kinds:
            t = calibrate.steps_for_budget(args.epsilon, q, args.noise, args.delta, k,
                                           args.max_steps, rel)
            table.add_row(k, f"{args.noise:g}", f">= {t}" if t >= args.max_steps else str(t))
    Console().print(table)
    return 0
