"""The all-reduced evaluation equals a single-process one: 2 gloo ranks, 7 sequences (shares of 4 and 3)."""

import json

import pytest

from tests.jobs import job_dict, run_ranks, set_in, toy_alpaca, toy_join


def test_two_rank_evaluation_equals_one_rank(tmp_path, tiny_model_dir):
    reports = {}
    for world in (1, 2):
        d = tmp_path / f"w{world}"
        raw = job_dict(d, tiny_model_dir)
        set_in(raw, "data.eval_files", [str(toy_alpaca(d / "new_eval.jsonl", n=7, seed=1))])
        set_in(raw, "monitor.suites", [{"name": "old", "files": [str(toy_join(d / "old.jsonl", n=7))]}])
        run_ranks(raw, world, d, entry="distrib_ft.jobs:evaluate", model_path=None, out=str(d / "eval"))
        reports[world] = json.loads((d / "eval" / "report.json").read_text())
    for world in (1, 2):
        assert reports[world]["suites"]["old"]["baseline"] > 0
    assert reports[2]["suites"]["old"]["baseline"] == pytest.approx(reports[1]["suites"]["old"]["baseline"], rel=1e-6)
    assert reports[2]["new_task"]["baseline"] == pytest.approx(reports[1]["new_task"]["baseline"], rel=1e-6)
