"""Plots and a Markdown summary of a run folder (``atoll report``), and run comparisons.

Reads ``metrics.jsonl`` (required), ``timings.jsonl``, ``final.json`` and ``config.toml``
(optional). Optional columns are plotted when present: ``sim_time`` (simulated seconds) and
``epsilon`` (privacy spent so far).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from atoll.runfiles import (has, last, reach, read_json, read_jsonl, read_metrics,  # noqa: E402
                            read_toml, series)


def report(run_dir) -> dict:
    """Write ``plots/*.png`` and ``summary.md`` into ``run_dir``; return the key numbers."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    final = read_json(run_dir / "final.json")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    if _is_vertical(run_dir, rows):
        return _vertical(run_dir, rows, final, plots_dir)
    written = [_rounds_png(rows, plots_dir / "rounds.png"), _bytes_png(rows, plots_dir / "bytes.png"),
               _clients_png(rows, final, plots_dir / "clients.png")]
    for key, name, label in (("sim_time", "time.png", "simulated time (s)"),
                             ("epsilon", "privacy.png", "privacy spent ε")):
        if has(rows, key):
            written.append(_acc_vs(rows, key, label, plots_dir / name))
    numbers = _numbers(rows, final)
    timings = read_jsonl(run_dir / "timings.jsonl") if (run_dir / "timings.jsonl").exists() else []
    numbers["wall_s"] = timings[-1][1].get("wall_s") if timings else None
    numbers["plots"] = [str(p) for p in written]
    numbers["privacy"] = final.get("privacy")
    (run_dir / "summary.md").write_text(_summary_md(run_dir, numbers, written))
    return numbers


def _is_vertical(run_dir, rows) -> bool:
    """A vertical run's folder (``atoll run`` on a ``[vertical]`` config): epochs, not rounds."""
    return isinstance(read_toml(run_dir / "config.toml").get("vertical"), dict) or has(rows, "epoch")


def _vertical(run_dir, rows, final, plots_dir) -> dict:
    """A vertical run: its epochs and steps, held-out accuracy, AUC and loss, and the payload
    bytes between the parties (no clients, no uplink/downlink)."""
    epochs, accs = series(rows, "epoch", "test_acc")
    best = max(range(len(accs)), key=lambda i: accs[i]) if accs else None
    n = {"epochs": rows[-1].get("epoch", rows[-1]["round"]), "steps": final.get("steps", last(rows, "steps")),
         "final_test_acc": last(rows, "test_acc"), "best_test_acc": accs[best] if accs else None,
         "best_epoch": epochs[best] if accs else None, "final_test_auc": last(rows, "test_auc"),
         "final_test_loss": last(rows, "test_loss"), "final_train_loss": last(rows, "train_loss"),
         "bytes_total": last(rows, "bytes_cum")}
    if n["final_test_acc"] is not None:
        for frac in (90, 95):
            n[f"epochs_to_{frac}pct_of_final"] = reach(rows, frac / 100 * n["final_test_acc"], "epoch")
    timings = read_jsonl(run_dir / "timings.jsonl") if (run_dir / "timings.jsonl").exists() else []
    n["wall_s"] = timings[-1][1].get("wall_s") if timings else None
    written = [_epochs_png(rows, plots_dir / "epochs.png"), _acc_vs(rows, "bytes_cum", "cumulative bytes "
               "between the parties", plots_dir / "bytes.png")]
    n["plots"] = [str(p) for p in written]
    cfg = read_toml(run_dir / "config.toml")
    v, pct = cfg.get("vertical") or {}, lambda x: "—" if x is None else f"{x:.2%}"  # noqa: E731
    mb = "—" if n["bytes_total"] is None else f"{n['bytes_total'] / 1e6:.3f}"
    parties = final.get("parties") or ([v.get("name", "?"), *v.get("parties", [])] if v else [])
    lines = [f"# {cfg.get('name', run_dir.name)}", "",
             f"vertical {v.get('protocol', '?')}" + (f" between {', '.join(map(str, parties))}" if parties else "")
             + f", {n['epochs']} epochs ({_num(n['steps'])} steps).", "", "| metric | value |", "|---|---|",
             f"| final held-out accuracy | {pct(n['final_test_acc'])} |",
             f"| best held-out accuracy | {pct(n['best_test_acc'])} (epoch {n['best_epoch']}) |",
             f"| final held-out AUC | {_num(n['final_test_auc'])} |",
             f"| final held-out loss | {_num(n['final_test_loss'])} |",
             f"| final train loss (mean over the epoch's steps) | {_num(n['final_train_loss'])} |",
             f"| MB between the parties (training payload) | {mb} |"]
    lines += [f"| epochs to {f}% of final accuracy | {_num(n[k])} |" for f in (90, 95)
              if (k := f"epochs_to_{f}pct_of_final") in n]
    if n["wall_s"] is not None:
        lines.append(f"| wall time | {n['wall_s']:.1f} s |")
    (run_dir / "summary.md").write_text("\n".join(lines + ["", *[f"![{p.stem}](plots/{p.name})" for p in written],
                                                             *_config_md(run_dir)]))
    return n


def _numbers(rows, final) -> dict:
    rounds, accs = series(rows, "round", "test_acc")
    best = max(range(len(accs)), key=lambda i: accs[i]) if accs else None
    final_acc = final.get("test_acc") if final.get("test_acc") is not None else (accs[-1] if accs else None)
    out = {"rounds": rows[-1]["round"], "final_test_acc": final_acc,
           "best_test_acc": accs[best] if best is not None else None,
           "best_round": rounds[best] if best is not None else None,
           "final_train_loss": last(rows, "train_loss"),
           "bytes_up_total": rows[-1].get("bytes_up_cum", sum(r.get("bytes_up", 0) for r in rows)),
           "bytes_down_total": rows[-1].get("bytes_down_cum", sum(r.get("bytes_down", 0) for r in rows))}
    fed = [r for r in rows if r.get("fed_acc_mean") is not None]
    for key in ("fed_acc_mean", "fed_acc_p10", "fed_acc_min"):
        out[key] = fed[-1].get(key) if fed else None
    out["fed_eval_round"] = fed[-1]["round"] if fed else None
    if final_acc is not None:
        for frac in (90, 95):
            out[f"rounds_to_{frac}pct_of_final"] = reach(rows, frac / 100 * final_acc)
    return out


def _summary_md(run_dir, n, written) -> str:
    cfg = read_toml(run_dir / "config.toml")
    title = cfg.get("name", run_dir.name)
    algo, data = (_section_name(cfg, k) for k in ("algorithm", "data"))
    pct = lambda v: "—" if v is None else f"{v:.2%}"  # noqa: E731
    what = f"{algo} on {data}, " if (algo, data) != ("?", "?") else ""
    lines = [f"# {title}", "", f"{what}{n['rounds']} rounds.", "",
             "| metric | value |", "|---|---|",
             f"| final test accuracy | {pct(n['final_test_acc'])} |",
             f"| best test accuracy | {pct(n['best_test_acc'])} (round {n['best_round']}) |",
             f"| final train loss | {_num(n['final_train_loss'])} |",
             f"| MB up / down | {n['bytes_up_total'] / 1e6:.3f} / {n['bytes_down_total'] / 1e6:.3f} |"]
    for frac in (90, 95):
        key = f"rounds_to_{frac}pct_of_final"
        if key in n:
            lines.append(f"| rounds to {frac}% of final accuracy | {_num(n[key])} |")
    if n["fed_eval_round"] is not None:
        lines.append(f"| client accuracy mean / p10 / min (round {n['fed_eval_round']}) | "
                     f"{pct(n['fed_acc_mean'])} / {pct(n['fed_acc_p10'])} / {pct(n['fed_acc_min'])} |")
    if n.get("wall_s") is not None:
        lines.append(f"| wall time | {n['wall_s']:.1f} s |")
    if n.get("privacy"):
        lines.append(f"| privacy | {_privacy_cell(n['privacy'])} |")
    lines += ["", *[f"![{p.stem}](plots/{p.name})" for p in written], *_config_md(run_dir)]
    return "\n".join(lines)


def _config_md(run_dir) -> list[str]:
    if not (run_dir / "config.toml").exists():
        return [""]
    text = (run_dir / "config.toml").read_text().rstrip()
    return ["", "<details><summary>config.toml</summary>", "", "```toml", text, "```", "", "</details>", ""]


def _privacy_cell(p: dict) -> str:
    """One line on how the run's epsilon was obtained (``final.json``'s ``privacy``)."""
    eps = p.get("epsilon")
    text = (f"ε = {eps:.4g} at δ = {p.get('delta'):g} ({p.get('mode')}, per {p.get('unit')}; "
            f"{p.get('accountant')} accountant, {p.get('neighboring')})" if eps is not None else "—")
    if p.get("target_epsilon") is not None:
        text += f"; target ε {p['target_epsilon']:g}"
    return text + (f"; **{p['stopped']}**" if p.get("stopped") else "")


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


def _epochs_png(rows, path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("test_acc", "accuracy (held-out)"), ("test_auc", "AUC (held-out)")):
        a.plot(*series(rows, "epoch", key), marker=".", label=label)
    a.set(xlabel="epoch", ylabel="accuracy / AUC", title="held-out accuracy and AUC")
    for key, label in (("train_loss", "train (mean over the epoch's steps)"), ("test_loss", "held-out")):
        b.plot(*series(rows, "epoch", key), label=label)
    b.set(xlabel="epoch", ylabel="loss", title="loss")
    return _save(fig, (a, b), path)


def _bytes_png(rows, path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "bytes_up_cum", "uplink"), (axes[1], "bytes_down_cum", "downlink")):
        xs, ys = series(rows, key, "test_acc")
        ax.plot([x / 1e6 for x in xs], ys, marker=".")
        ax.set(xlabel=f"cumulative {label} MB", ylabel="test accuracy", title=f"accuracy vs {label} bytes")
        _maybe_log(ax, xs)
    return _save(fig, axes, path, legend=False)


def _clients_png(rows, final, path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    keys = ("round", "fed_acc_mean", "fed_acc_p10", "fed_acc_min")
    pts = [[r[k] for k in keys] for r in rows if all(r.get(k) is not None for k in keys)]
    if pts:
        xs, mean, p10, lo = zip(*pts)
        a.plot(xs, mean, label="mean (sample-weighted)")
        a.fill_between(xs, p10, mean, alpha=0.3, label="p10 .. mean")
        a.plot(xs, lo, linestyle="--", label="min")
    a.set(xlabel="round", ylabel="accuracy", title="accuracy across clients")
    accs = [v for v in (final.get("client_acc") or []) if v is not None]
    b.hist(accs, bins=20, range=(0, 1), edgecolor="white")
    if not accs:
        b.text(0.5, 0.5, "no per-client accuracies (final.json)", ha="center", transform=b.transAxes)
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
    reach ``target_acc`` (rounds, bytes up, bytes down, simulated time; for vertical runs: epochs
    and the bytes between the parties). Runs of both kinds are refused. Returns the table rows."""
    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    labels = list(labels) if labels else [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run folders")
    runs = [read_metrics(Path(d)) for d in run_dirs]
    kinds = {d: _is_vertical(Path(d), rows) for d, rows in zip(run_dirs, runs)}
    if len(set(kinds.values())) > 1:  # epochs of parties and rounds of clients share no axis
        raise ValueError("compare: runs of one kind only, vertical (epochs): "
                         f"{[str(d) for d, v in kinds.items() if v]}, horizontal (rounds): "
                         f"{[str(d) for d, v in kinds.items() if not v]}")
    vertical = any(kinds.values())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _compare_png(runs, labels, out / "compare.png", vertical)
    with_time = any(has(rows, "sim_time") for rows in runs)
    keys = ("epoch", "bytes_cum") if vertical else ("round", "bytes_up_cum", "bytes_down_cum")
    table = []
    for rows, label in zip(runs, labels):
        accs = series(rows, keys[0], "test_acc")[1]
        row = {"run": label, "final_acc": accs[-1] if accs else None, "best_acc": max(accs) if accs else None}
        if target_acc is not None:
            for key in keys + (("sim_time",) if with_time else ()):
                row[f"{key}_to_target"] = reach(rows, target_acc, key)
        table.append(row)
    (out / "compare.md").write_text(_table_md(table, target_acc))
    return table


def _compare_png(runs, labels, path, vertical=False) -> Path:
    loss = "global_train_loss" if all(has(rows, "global_train_loss") for rows in runs) else "train_loss"
    panels = [("epoch", "test_acc", "epoch"), ("epoch", "train_loss", "epoch"),
              ("bytes_cum", "test_acc", "cumulative MB between the parties")] if vertical else [
              ("round", "test_acc", "round"), ("round", loss, "round"),
              ("bytes_up_cum", "test_acc", "cumulative uplink MB"),
              ("bytes_down_cum", "test_acc", "cumulative downlink MB")]
    if all(has(rows, "sim_time") for rows in runs):
        panels.append(("sim_time", "test_acc", "simulated time (s)"))
    if any(has(rows, "epsilon") for rows in runs):  # privacy: runs without epsilon are lines
        panels.append(("epsilon", "test_acc", "privacy spent ε"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (x, y, xlabel) in zip(axes, panels):
        scale = 1e6 if x.startswith("bytes") else 1
        all_x = []
        for i, (rows, label) in enumerate(zip(runs, labels)):
            if x == "epsilon" and not has(rows, "epsilon"):
                accs = series(rows, "round", y)[1]
                if accs:
                    ax.axhline(accs[-1], linestyle="--", color=f"C{i}", label=f"{label} (no DP)")
                continue
            xs, ys = series(rows, x, y)
            all_x += [v / scale for v in xs]
            ax.plot([v / scale for v in xs], ys, marker=".", label=label, color=f"C{i % 10}")
        ax.set(xlabel=xlabel, ylabel=y.replace("_", " "))
        if scale != 1:
            _maybe_log(ax, all_x)
    return _save(fig, axes, path)


def _table_md(table, target) -> str:
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in cols) + " |" for r in table]
    head = f"Target test accuracy: {target:.2%}\n\n" if target is not None else ""
    return head + "\n".join(lines) + "\n"


def _cell(col: str, v) -> str:
    if v is None:
        return "—"
    if col.endswith("_acc"):
        return f"{v:.2%}"
    if col.startswith("bytes"):
        return _bytes(v)
    return _num(v)


def _bytes(v) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return f"{v / size:.3g} {unit}"
    return f"{v} B"


def _num(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _maybe_log(ax, xs) -> None:
    """Log-x when the positive values span more than two decades."""
    pos = [x for x in xs if x > 0]
    if pos and max(pos) / min(pos) > 100:
        ax.set_xscale("log")


def _section_name(cfg: dict, section: str) -> str:
    sec = cfg.get(section)
    return str(sec.get("name", "?")) if isinstance(sec, dict) else "?"
