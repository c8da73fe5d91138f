"""A run built to forget: a tiny model is taught an old skill, then fully fine-tuned on a new one with a high
learning rate. The monitor must see the old skill degrade from step 0 and stop, roll back, or reject.
Measured here: the old skill's NLL rises +43% by step 2, +98% by step 10, +152% by step 20, while the new
task's falls 7.30 -> 2.56 by step 30; with a +100% budget, steps 0-10 are within it."""

import json

import pytest

from distrib_ft.config import config_from_dict
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, set_in, toy_alpaca, toy_join


@pytest.fixture(scope="module")
def old_skill_model(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("old-skill")
    raw = job_dict(d, tiny_model_dir, zero=0, max_steps=40, learning_rate=3e-3, lr_scheduler_type="constant")
    set_in(raw, "method.type", "full")
    train(config_from_dict(raw))
    toy_alpaca(d / "old_eval.jsonl", n=24, seed=99)
    return d


def forget_job(tmp_path, old, policy, budget=1.0):
    raw = job_dict(tmp_path, old / "out" / "final", zero=0, max_steps=30, learning_rate=3e-3,
                   lr_scheduler_type="constant", eval_steps=10, save_steps=0, save_total_limit=2)
    set_in(raw, "method.type", "full")
    set_in(raw, "data.train_files", [str(toy_join(tmp_path / "new.jsonl"))])
    set_in(raw, "data.eval_files", [str(toy_join(tmp_path / "new_eval.jsonl", n=16, seed=6))])
    set_in(raw, "monitor", {"policy": policy, "eval_at": [0, 2, 5],
                            "suites": [{"name": "old_skill", "files": [str(old / "old_eval.jsonl")],
                                        "metric": "nll", "max_relative_increase": budget}]})
    return raw


def test_stop_policy_ends_the_run_and_keeps_the_last_model_within_budget(tmp_path, old_skill_model):
    summary = train(config_from_dict(forget_job(tmp_path, old_skill_model, "stop")))
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    old = report["suites"]["old_skill"]
    assert old["evaluations"][0]["step"] == 0 and old["baseline"] == old["evaluations"][0]["value"]
    assert report["breaches"] and summary["steps"] == report["breaches"][0]["step"] < 30  # stopped early
    assert report["decision"] == "stopped" and summary["exit_code"] == 0
    chosen = report["chosen_step"]
    assert 0 < chosen < summary["steps"]
    assert next(e for e in old["evaluations"] if e["step"] == chosen)["within_budget"]
    assert (out / "final" / "model.safetensors").exists() and not (out / "rejected").exists()
    # The report holds the measured values: the same numbers as metrics.jsonl.
    logged = {r["step"]: r["retention/old_skill"] for r in read_metrics(out / "metrics.jsonl")
              if "retention/old_skill" in r}
    assert logged == {e["step"]: e["value"] for e in old["evaluations"]}
    md = (out / "report.md").read_text().splitlines()
    assert md[2] == (f"**Stopped**: training stopped when a retention budget was breached; final/ is step {chosen}, "
                     "the last evaluated checkpoint within every budget")
    assert any(line.startswith("| old_skill | nll | ") and line.endswith(" | yes |") for line in md), md
    assert (out / "plots" / "old_skill.png").stat().st_size > 5000 and (out / "plots" / "new_task.png").exists()


def test_rollback_goes_on_and_picks_the_best_checkpoint_within_budget(tmp_path, old_skill_model):
    summary = train(config_from_dict(forget_job(tmp_path, old_skill_model, "rollback")))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["steps"] == 30 and report["breaches"]
    assert report["decision"] == "rolled_back" and summary["exit_code"] == 0
    within = [e["step"] for e in report["suites"]["old_skill"]["evaluations"] if e["within_budget"]]
    new = {e["step"]: e["value"] for e in report["new_task"]["evaluations"]}
    assert report["chosen_step"] == min(within, key=lambda s: new[s]) > 0
    # the gain is the new task's improvement at the chosen step over its step-0 baseline
    gain = report["new_task"]["baseline"] - new[report["chosen_step"]]
    assert report["new_task"]["gain"] == pytest.approx(gain) and gain > 0


def test_report_policy_rejects_a_model_out_of_budget_with_exit_code_3(tmp_path, old_skill_model):
    summary = train(config_from_dict(forget_job(tmp_path, old_skill_model, "report")))
    out = tmp_path / "out"
    assert summary["exit_code"] == 3 and summary["decision"] == "rejected"
    assert (out / "rejected" / "model.safetensors").exists() and not (out / "final").exists()
    report = json.loads((out / "report.json").read_text())
    decision = (report["decision"], report["chosen_step"], report["exit_code"], report["policy"])
    assert decision == ("rejected", None, 3, "report")
    last = report["suites"]["old_skill"]["evaluations"][-1]
    assert last["step"] == summary["steps"] == 30 and not last["within_budget"]  # the report policy trains on
    md = (out / "report.md").read_text().splitlines()
    assert md[2] == ("**Rejected** (exit code 3): no update stayed within the budget: no evaluated checkpoint after "
                     "step 0 kept every retention suite within budget")
    assert "Policy: `report`; chosen checkpoint: none" in md


@pytest.mark.parametrize("policy", ["stop", "rollback"])
def test_a_run_whose_every_update_breaks_the_budget_is_rejected(tmp_path, old_skill_model, policy):
    """The old skill's NLL rises +43% by step 2 (the first evaluation after step 0): with a 2% budget no update
    stays within it. Step 0, the untouched start, must not count as a model to keep (it used to: exit 0,
    final/ = the start)."""
    summary = train(config_from_dict(forget_job(tmp_path, old_skill_model, policy, budget=0.02)))
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert (summary["exit_code"], summary["decision"], report["chosen_step"]) == (3, "rejected", None)
    assert all(not e["within_budget"] for e in report["suites"]["old_skill"]["evaluations"][1:])
    assert (out / "rejected").is_dir() and not (out / "final").exists()
    assert "no update stayed within the budget" in (out / "report.md").read_text().splitlines()[2]
