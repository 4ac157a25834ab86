"""The demo: its closing math (pure) and the fast CI variant of the whole loop, end to end."""
from __future__ import annotations

import json

import pytest

from pipelines.demo.run import FAST, DemoSettings, demo_settings, main
from pipelines.demo.summary import mean_accuracy, relative_mce, results_table, verdict


def test_relative_mce_is_100_for_the_baseline_and_follows_errors():
    base = {"noise": [0.2, 0.4], "blur": [0.1, 0.3]}
    assert relative_mce(base, base) == pytest.approx(100.0)
    better = {"noise": [0.1, 0.2], "blur": [0.1, 0.3]}  # half the noise errors, same blur errors
    assert relative_mce(better, base) == pytest.approx(75.0)
    assert mean_accuracy(base) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="same corruptions"):
        relative_mce({"noise": [0.1, 0.2]}, base)
    with pytest.raises(ValueError, match="severities"):
        relative_mce({"noise": [0.1], "blur": [0.1, 0.3]}, base)


def test_table_and_verdict_report_both_signs():
    rows = [{"name": "with", "clean": 0.5, "corrupt": 0.4, "mce": 90.0, "token_iou": 0.3, "token_is_class": 0.2},
            {"name": "without", "clean": 0.6, "corrupt": 0.35, "mce": 100.0, "token_iou": None, "token_is_class": 0.1}]
    table = results_table(rows)
    assert "50.0" in table and "n/a" in table and len(table.splitlines()) == 4
    v = verdict(rows[0], rows[1])
    assert "clean top-1 -10.0 points" in v and "corrupted top-1 +5.0 points" in v and "90.0" in v


def test_cli_flags_make_the_fast_variant():
    s = demo_settings("x", fast=True, views=3, seed=None)
    assert s.out == "x" and s.views == 3 and s.num_train == FAST["num_train"] and s.max_steps_per_epoch == 3
    assert demo_settings("x").num_train == DemoSettings().num_train and demo_settings("x").seed == 0
    with pytest.raises(ValueError, match="64"):
        DemoSettings(image_size=96)


def test_demo_options_are_one_cli_command_and_bad_ones_exit_2(tmp_path, capsys):
    # `python -m pipelines.demo` forwards to `stl-labels demo`: same options, same one-line user errors.
    assert main(["--fast", "--out", str(tmp_path / "d"), "--views", "0"]) == 2
    assert "error: demo setting views must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert main(["--help"]) == 0 and "--labeler-epochs" in capsys.readouterr().out


@pytest.mark.timeout(600)
def test_fast_demo_runs_the_whole_loop(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--fast", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for step in range(1, 10):
        assert f"[{step}/9]" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["steps"]) == {"data", "labeler", "generate", "verify", "report", "student_tl", "student_cls",
                                     "eval", "token_iou"}
    assert summary["steps"]["verify"]["summary"].startswith("OK")
    rows = {r["name"]: r for r in summary["table"]}
    assert len(rows) == 3
    for r in rows.values():
        assert 0.0 <= r["clean"] <= 1.0 and 0.0 <= r["token_iou"] <= 1.0
    assert rows["student, no token labels"]["mce"] == pytest.approx(100.0)
    assert (out / "report" / "index.html").exists() and (out / "summary.txt").read_text().startswith("model")
