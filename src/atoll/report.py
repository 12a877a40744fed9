"""Plots and a Markdown summary of a run folder (``atoll report``), and run comparisons.

Reads ``metrics.jsonl`` (required), ``timings.jsonl``, ``final.json`` and ``config.toml``
(optional). Optional columns are plotted when present: ``sim_time`` (simulated seconds) and
``epsilon`` (privacy spent so far).
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {i} is not valid JSON ({exc.msg})") from None
    if not rows:
        raise ValueError(f"{path} is empty: the run has not finished a round")
    return rows


def series(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    """(x, y) pairs of the rows where both are present and not null."""
    pts = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def reach(rows: list[dict], target: float, x: str = "round"):
    """The first value of ``x`` at which ``test_acc`` >= target, or None."""
    for r in rows:
        if r.get("test_acc") is not None and r["test_acc"] >= target and r.get(x) is not None:
            return r[x]
    return None


def report(run_dir) -> dict:
    """Write ``plots/*.png`` and ``summary.md`` into ``run_dir``; return the key numbers."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    final = _json(run_dir / "final.json")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    written = [_rounds_png(rows, plots_dir / "rounds.png"), _bytes_png(rows, plots_dir / "bytes.png"),
               _clients_png(rows, final, plots_dir / "clients.png")]
    for key, name, label in (("sim_time", "time.png", "simulated time (s)"),
                             ("epsilon", "privacy.png", "privacy spent ε")):
        if any(r.get(key) is not None for r in rows):
            written.append(_acc_vs(rows, key, label, plots_dir / name))
    numbers = _numbers(rows, final)
    numbers["plots"] = [str(p) for p in written]
    (run_dir / "summary.md").write_text(_summary_md(run_dir, rows, final, numbers, written))
    return numbers


def _numbers(rows, final) -> dict:
    rounds, accs = series(rows, "round", "test_acc")
    best = max(range(len(accs)), key=lambda i: accs[i]) if accs else None
    out = {"rounds": rows[-1]["round"], "final_test_acc": final.get("test_acc", accs[-1] if accs else None),
           "best_test_acc": accs[best] if best is not None else None,
           "best_round": rounds[best] if best is not None else None,
           "final_train_loss": next((r["train_loss"] for r in reversed(rows) if r.get("train_loss") is not None), None),
           "bytes_up_total": rows[-1].get("bytes_up_cum", sum(r.get("bytes_up", 0) for r in rows)),
           "bytes_down_total": rows[-1].get("bytes_down_cum", sum(r.get("bytes_down", 0) for r in rows))}
    if out["final_test_acc"] is not None:
        for frac in (0.9, 0.95):
            out[f"rounds_to_{int(frac * 100)}pct_of_final"] = reach(rows, frac * out["final_test_acc"])
    return out


def _summary_md(run_dir, rows, final, n, written) -> str:
    cfg = _toml(run_dir / "config.toml")
    title = cfg.get("name", run_dir.name)
    algo = cfg.get("algorithm", {}).get("name", "?")
    data = cfg.get("data", {}).get("name", "?")
    pct = lambda v: "—" if v is None else f"{v:.2%}"  # noqa: E731
    lines = [f"# {title}", "", f"{algo} on {data}, {n['rounds']} rounds.", "",
             "| metric | value |", "|---|---|",
             f"| final test accuracy | {pct(n['final_test_acc'])} |",
             f"| best test accuracy | {pct(n['best_test_acc'])} (round {n['best_round']}) |",
             f"| final train loss | {n['final_train_loss'] if n['final_train_loss'] is None else round(n['final_train_loss'], 4)} |",
             f"| MB up / down | {n['bytes_up_total'] / 1e6:.3f} / {n['bytes_down_total'] / 1e6:.3f} |"]
    for frac in (90, 95):
        key = f"rounds_to_{frac}pct_of_final"
        if key in n:
            lines.append(f"| rounds to {frac}% of final accuracy | {n[key]} |")
    fed = [r for r in rows if r.get("fed_acc_mean") is not None]
    if fed:
        f = fed[-1]
        lines.append(f"| client accuracy mean / p10 / min (round {f['round']}) | "
                     f"{pct(f['fed_acc_mean'])} / {pct(f['fed_acc_p10'])} / {pct(f['fed_acc_min'])} |")
    timings = _jsonl(run_dir / "timings.jsonl")
    if timings:
        lines.append(f"| wall time | {timings[-1]['wall_s']:.1f} s |")
    lines += ["", *[f"![{p.stem}](plots/{p.name})" for p in written], ""]
    return "\n".join(lines)


def _rounds_png(rows, path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(*series(rows, "round", "test_acc"), marker=".", label="test (held-out)")
    a.plot(*series(rows, "round", "fed_acc_mean"), marker=".", label="clients' local tests")
    a.set(xlabel="round", ylabel="accuracy", title="accuracy")
    for key, label in (("train_loss", "train (local)"), ("test_loss", "test"),
                       ("global_train_loss", "train (global model)")):
        xs, ys = series(rows, "round", key)
        if xs:
            b.plot(xs, ys, label=label)
    b.set(xlabel="round", ylabel="loss", title="loss")
    return _save(fig, (a, b), path)


def _bytes_png(rows, path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "bytes_up_cum", "uplink"), (axes[1], "bytes_down_cum", "downlink")):
        xs, ys = series(rows, key, "test_acc")
        ax.plot([x / 1e6 for x in xs], ys, marker=".")
        ax.set(xlabel=f"cumulative {label} MB", ylabel="test accuracy", title=f"accuracy vs {label} bytes")
        if xs and min(xs) > 0 and max(xs) / min(xs) > 100:
            ax.set_xscale("log")
    return _save(fig, axes, path, legend=False)


def _clients_png(rows, final, path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs, mean = series(rows, "round", "fed_acc_mean")
    _, p10 = series(rows, "round", "fed_acc_p10")
    _, lo = series(rows, "round", "fed_acc_min")
    if xs:
        a.plot(xs, mean, label="mean (sample-weighted)")
        a.fill_between(xs, p10, mean, alpha=0.3, label="p10 .. mean")
        a.plot(xs, lo, linestyle="--", label="min")
    a.set(xlabel="round", ylabel="accuracy", title="accuracy across clients")
    accs = [v for v in (final.get("client_acc") or []) if v is not None]
    b.hist(accs, bins=min(20, max(1, len(accs))), range=(0, 1))
    b.set(xlabel="final accuracy on local test split", ylabel="clients", title="final per-client accuracy")
    return _save(fig, (a,), path, extra=(b,))


def _acc_vs(rows, key, label, path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(*series(rows, key, "test_acc"), marker=".")
    ax.set(xlabel=label, ylabel="test accuracy")
    return _save(fig, (ax,), path, legend=False)


def _save(fig, axes, path, legend=True, extra=()) -> Path:
    for ax in (*axes, *extra):
        ax.grid(alpha=0.3)
    if legend:
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def compare(run_dirs, out, labels=None, target_acc=None) -> list[dict]:
    """Overlay runs in ``out/compare.png``; ``out/compare.md`` tabulates what each needs to
    reach ``target_acc`` (rounds, bytes up, bytes down, simulated time)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_metrics(Path(d)) for d in run_dirs]
    labels = labels or [Path(d).name for d in run_dirs]
    has = lambda key: all(any(r.get(key) is not None for r in rows) for rows in runs)  # noqa: E731
    loss = "global_train_loss" if has("global_train_loss") else "train_loss"
    panels = [("round", "test_acc", "round"), ("round", loss, "round"),
              ("bytes_up_cum", "test_acc", "cumulative uplink bytes"),
              ("bytes_down_cum", "test_acc", "cumulative downlink bytes")]
    if has("sim_time"):
        panels.append(("sim_time", "test_acc", "simulated time (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (x, y, xlabel) in zip(axes, panels):
        for rows, label in zip(runs, labels):
            ax.plot(*series(rows, x, y), label=label)
        ax.set(xlabel=xlabel, ylabel=y)
        if x.startswith("bytes"):
            ax.set_xscale("log")
    _save(fig, axes, out / "compare.png")
    table = []
    for rows, label in zip(runs, labels):
        accs = series(rows, "round", "test_acc")[1]
        row = {"run": label, "final_acc": accs[-1] if accs else None, "best_acc": max(accs) if accs else None}
        if target_acc is not None:
            for key in ("round", "bytes_up_cum", "bytes_down_cum", "sim_time"):
                row[f"{key}_to_target"] = reach(rows, target_acc, key)
        table.append(row)
    (out / "compare.md").write_text(_table_md(table, target_acc))
    return table


def _table_md(table, target) -> str:
    cols = list(table[0])
    fmt = lambda v: "—" if v is None else (f"{v:.2%}" if isinstance(v, float) and v <= 1 else f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    head = f"Target test accuracy: {target:.2%}\n\n" if target is not None else ""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in table]
    return head + "\n".join(lines) + "\n"


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _jsonl(path, default=None) -> list[dict]:
    if not path or not Path(path).exists():
        return default or []
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


def _toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError:
        return {}
