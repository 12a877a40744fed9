import json

import matplotlib.pyplot as plt
import pytest

from atoll.report import _maybe_log, compare, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(path, accs, sim=False, eps=False, up=100, down=1000, final=True, timings=False,
              config=None):
    """A run folder with one metrics line per entry of ``accs`` (None: not an eval round)."""
    path.mkdir(parents=True)
    rows, cu, cd = [], 0, 0
    for r, acc in enumerate(accs, start=1):
        cu, cd = cu + up, cd + down
        row = {"round": r, "train_loss": 1.0 / r, "clients_sampled": 3, "clients_succeeded": 3,
               "bytes_up": up, "bytes_down": down, "bytes_up_cum": cu, "bytes_down_cum": cd,
               "test_acc": acc, "test_loss": None if acc is None else 1 - acc}
        if acc is not None:
            row.update(fed_acc_mean=acc - 0.05, fed_acc_p10=acc - 0.1, fed_acc_min=acc - 0.2,
                       fed_loss_mean=1 - acc)
        if sim:
            row["sim_time"] = 10.0 * r
        if eps:
            row["epsilon"] = 0.5 * r
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if final:
        (path / "final.json").write_text(json.dumps(
            {"test_acc": accs[-1], "test_loss": 0.2, "rounds": len(accs), "client_acc": [0.5, None, 0.9]}))
    if timings:
        (path / "timings.jsonl").write_text(
            "".join(json.dumps({"round": r, "wall_s": 1.5 * r}) + "\n" for r in range(1, len(accs) + 1)))
    if config:
        (path / "config.toml").write_text(config)
    return path


def _is_png(p):
    data = p.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


def _names(numbers):
    return {p.replace("\\", "/").split("/")[-1] for p in numbers["plots"]}


ACCS = [None, 0.5, None, 0.74, None, 0.9, None, 0.8]  # eval every 2 rounds, nulls between


def test_report_numbers_plots_and_summary(tmp_path):
    run = _fake_run(tmp_path / "r", ACCS, timings=True,
                    config='name = "demo-run"\n[algorithm]\nname = "fedavg"\n[data]\nname = "mnist"\n')
    n = report(run)
    assert n["rounds"] == 8
    assert n["final_test_acc"] == 0.8 and n["best_test_acc"] == 0.9 and n["best_round"] == 6
    assert n["bytes_up_total"] == 800 and n["bytes_down_total"] == 8000
    assert n["final_train_loss"] == pytest.approx(1 / 8)
    assert n["rounds_to_90pct_of_final"] == 4  # 0.72: 0.5 < 0.72 <= 0.74
    assert n["rounds_to_95pct_of_final"] == 6  # 0.76: 0.74 < 0.76 <= 0.9
    assert n["fed_acc_mean"] == pytest.approx(0.75) and n["fed_eval_round"] == 8
    assert n["wall_s"] == 12.0
    assert _names(n) == {"rounds.png", "bytes.png", "clients.png"}
    assert all(_is_png(run / "plots" / name) for name in _names(n))
    md = (run / "summary.md").read_text()
    assert md.startswith("# demo-run") and "fedavg on mnist, 8 rounds" in md
    assert "| final test accuracy | 80.00% |" in md and "90.00% (round 6)" in md
    assert "| MB up / down | 0.001 / 0.008 |" in md
    assert "75.00% / 70.00% / 60.00%" in md and "| wall time | 12.0 s |" in md
    assert "![rounds](plots/rounds.png)" in md and "```toml" in md


def test_report_without_optional_files(tmp_path):
    run = _fake_run(tmp_path / "r", [None, 0.6, 0.7], final=False)
    n = report(run)
    assert n["final_test_acc"] == 0.7 and n["wall_s"] is None
    md = (run / "summary.md").read_text()
    assert "wall time" not in md and "config.toml" not in md and md.startswith("# r")
    assert _is_png(run / "plots" / "clients.png")


@pytest.mark.parametrize("sim,eps,extra", [(False, False, set()), (True, False, {"time.png"}),
                                           (False, True, {"privacy.png"}),
                                           (True, True, {"time.png", "privacy.png"})])
def test_optional_plots_only_when_columns_present(tmp_path, sim, eps, extra):
    run = _fake_run(tmp_path / "r", [None, 0.3, None, 0.6], sim=sim, eps=eps)
    n = report(run)
    assert _names(n) == {"rounds.png", "bytes.png", "clients.png"} | extra
    assert {p.name for p in (run / "plots").iterdir()} == _names(n)
    assert all(_is_png(run / "plots" / name) for name in extra)


def test_log_x_only_beyond_two_decades():
    fig, (a, b) = plt.subplots(1, 2)
    _maybe_log(a, [0.01, 0.5, 2.0])
    _maybe_log(b, [1.0, 50.0, 99.0])
    assert a.get_xscale() == "log" and b.get_xscale() == "linear"
    plt.close(fig)


def test_compare_table_reach_target(tmp_path):
    a = _fake_run(tmp_path / "a", [None, 0.7, None, 0.92], up=10, sim=True)
    b = _fake_run(tmp_path / "b", [None, 0.6, None, 0.8], up=1, sim=True)
    rows = compare([a, b], tmp_path / "cmp", labels=["A", "B"], target_acc=0.9)
    assert rows[0] == {"run": "A", "final_acc": 0.92, "best_acc": 0.92, "round_to_target": 4,
                       "bytes_up_cum_to_target": 40, "bytes_down_cum_to_target": 4000,
                       "sim_time_to_target": 40.0}
    assert rows[1]["final_acc"] == 0.8 and rows[1]["round_to_target"] is None
    assert rows[1]["bytes_up_cum_to_target"] is None and rows[1]["sim_time_to_target"] is None
    assert _is_png(tmp_path / "cmp" / "compare.png")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Target test accuracy: 90.00%" in md
    assert "| A | 92.00% | 92.00% | 4 | 40 B | 4 kB | 40 |" in md
    assert "| B | 80.00% | 80.00% | — | — | — | — |" in md


def test_compare_without_sim_time_or_target(tmp_path):
    a = _fake_run(tmp_path / "a", [0.5, 0.6])
    rows = compare([a], tmp_path / "cmp")
    assert rows == [{"run": "a", "final_acc": 0.6, "best_acc": 0.6}]
    rows = compare([a], tmp_path / "cmp", target_acc=0.55)
    assert "sim_time_to_target" not in rows[0] and rows[0]["round_to_target"] == 2
    with pytest.raises(ValueError, match="labels"):
        compare([a], tmp_path / "cmp", labels=["x", "y"])


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        report(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"round": 1}\n\n{not json\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 3 is not valid JSON"):
        report(tmp_path)
    metrics.write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        report(tmp_path)
    metrics.write_text('{"round": 1}\n{"train_loss": 0.5}\n')
    with pytest.raises(ValueError, match="line 2 has no integer 'round'"):
        report(tmp_path)
    metrics.write_text("\n")
    with pytest.raises(ValueError, match="metrics.jsonl is empty"):
        report(tmp_path)


def test_malformed_final_json_is_named(tmp_path):
    run = _fake_run(tmp_path / "r", [0.5], final=False)
    (run / "final.json").write_text("{oops")
    with pytest.raises(ValueError, match="final.json"):
        report(run)
