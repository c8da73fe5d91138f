"""The forgetting report: files, contents, plots."""

import json

import matplotlib.image as mpimg
import pytest

from distrib_ft.monitor.report import budget_limit, render_markdown, write_report


def _report(decision="rolled_back", chosen=20, exit_code=0) -> dict:
    def ev(step, value, baseline, limit, kind):
        within = value <= limit if kind == "loss" else value >= limit
        return {"step": step, "value": value, "delta": value - baseline,
                "relative": (value - baseline) / baseline if kind == "loss" else None, "within_budget": within}

    nll = [ev(s, v, 2.0, 2.2, "loss") for s, v in ((10, 2.05), (20, 2.15), (30, 2.31), (40, 2.4))]
    em = [ev(s, v, 0.8, 0.75, "score") for s, v in ((10, 0.8), (20, 0.78), (30, 0.7), (40, 0.72))]
    return {
        "decision": decision, "exit_code": exit_code, "chosen_step": chosen, "policy": "rollback",
        "suites": {
            "general_nll": {"metric": "nll", "kind": "loss", "baseline": 2.0, "evaluations": nll,
                            "budget": {"max_relative_increase": 0.1, "max_absolute_drop": None}},
            "qa exact/match": {"metric": "exact_match", "kind": "score", "baseline": 0.8, "evaluations": em,
                               "budget": {"max_relative_increase": None, "max_absolute_drop": 0.05}},
        },
        "new_task": {"metric": "nll", "kind": "loss", "baseline": 3.0, "gain": 1.25,
                     "evaluations": [{"step": s, "value": v, "delta": v - 3.0}
                                     for s, v in ((10, 2.5), (20, 1.75), (30, 1.4), (40, 1.2))]},
        "breaches": [{"step": 30, "suite": "general_nll", "value": 2.31, "limit": 2.2},
                     {"step": 30, "suite": "qa exact/match", "value": 0.7, "limit": 0.75},
                     {"step": 40, "suite": "general_nll", "value": 2.4, "limit": 2.2},
                     {"step": 40, "suite": "qa exact/match", "value": 0.72, "limit": 0.75}],
        "notes": ["final/ restored from checkpoints/step-20"],
    }


def test_write_report_files(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    assert names == ["plots/general_nll.png", "plots/new_task.png", "plots/qa_exact_match.png",
                     "report.json", "report.md"]
    assert all(p.exists() for p in paths)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert not [p for p in tmp_path.rglob(".*")], "temp files left behind"
    for p in paths[2:]:
        img = mpimg.imread(p)
        assert img.shape[:2] == (450, 800) and p.stat().st_size > 10_000
        assert img.std() > 0.01  # not blank


def test_markdown_contents(tmp_path):
    write_report(_report(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Rolled back**: final/ is step 20, the checkpoint within every retention "
                                         "budget with the lowest new-task eval loss")
    for baseline, final in (("2.0000", "2.1500"), ("0.8000", "0.7800"), ("3.0000", "1.7500")):
        assert f"| {baseline} | {final} (step 20)" in md
    assert "+0.1500 (+7.5%)" in md and "rise <= 10.0%" in md and "drop <= 0.05" in md
    assert "+1.2500" in md  # new-task gain
    assert "- step 30: general_nll = 2.3100 (limit 2.2000)" in md
    assert "![general_nll](plots/general_nll.png)" in md and "plots/new_task.png" in md
    assert "final/ restored from checkpoints/step-20" in md


def test_rejected_decision_line():
    md = render_markdown(_report(decision="rejected", chosen=None, exit_code=3))
    assert md.splitlines()[2].startswith("**Rejected** (exit code 3): no update stayed within the budget: ")
    assert "2.4000 (step 40)" in md  # without a chosen step, the last evaluation is the final value
    assert "chosen checkpoint: none" in md


def test_budget_limit():
    assert budget_limit("loss", 2.0, {"max_relative_increase": 0.1, "max_absolute_drop": None}) == pytest.approx(2.2)
    assert budget_limit("score", 0.8, {"max_relative_increase": None, "max_absolute_drop": 0.05}) == pytest.approx(0.75)
    assert budget_limit("score", 0.8, {"max_relative_increase": None, "max_absolute_drop": None}) is None
