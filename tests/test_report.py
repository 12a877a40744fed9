import json

import pytest

from atoll.report import compare, report


def _fake_run(path, accs, sim=False, eps=False, up=100, down=1000):
    path.mkdir(parents=True)
    rows, cu, cd = [], 0, 0
    for r, acc in enumerate(accs, start=1):
        cu, cd = cu + up, cd + down
        row = {"round": r, "train_loss": 1.0 / r, "clients_sampled": 3, "clients_succeeded": 3,
               "bytes_up": up, "bytes_down": down, "bytes_up_cum": cu, "bytes_down_cum": cd}
        if acc is not None:
            row.update(test_acc=acc, test_loss=1 - acc, fed_acc_mean=acc, fed_acc_p10=acc - 0.1,
                       fed_acc_min=acc - 0.2, fed_loss_mean=1 - acc)
        if sim:
            row["sim_time"] = 10.0 * r
        if eps:
            row["epsilon"] = 0.5 * r
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "final.json").write_text(json.dumps({"test_acc": accs[-1], "client_acc": [0.5, None, 0.9]}))
    return path


def _is_png(p):
    data = p.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_numbers_plots_and_summary(tmp_path):
    run = _fake_run(tmp_path / "r", [None, 0.5, None, 0.9, None, 0.8])
    n = report(run)
    assert n["final_test_acc"] == 0.8 and n["best_test_acc"] == 0.9 and n["best_round"] == 4
    assert n["bytes_up_total"] == 600 and n["bytes_down_total"] == 6000
    assert n["rounds_to_90pct_of_final"] == 4  # 0.5 < 0.72 <= 0.9
    names = {p.split("/")[-1] for p in n["plots"]}
    assert names == {"rounds.png", "bytes.png", "clients.png"}
    assert all(_is_png(run / "plots" / name) for name in names)
    md = (run / "summary.md").read_text()
    assert "80.00%" in md and "90.00% (round 4)" in md


def test_optional_plots_only_when_columns_present(tmp_path):
    n = report(_fake_run(tmp_path / "r", [0.3, 0.6], sim=True, eps=True))
    assert {p.split("/")[-1] for p in n["plots"]} >= {"time.png", "privacy.png"}


def test_compare_table_reach_target(tmp_path):
    a = _fake_run(tmp_path / "a", [0.5, 0.7, 0.92], up=10)
    b = _fake_run(tmp_path / "b", [0.4, 0.6, 0.8], up=1)
    rows = compare([a, b], tmp_path / "cmp", labels=["A", "B"], target_acc=0.9)
    assert rows[0]["round_to_target"] == 3 and rows[0]["bytes_up_cum_to_target"] == 30
    assert rows[1]["round_to_target"] is None
    assert _is_png(tmp_path / "cmp" / "compare.png")
    assert "| B |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        report(tmp_path)
