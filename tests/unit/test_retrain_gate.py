"""distrib_ft/retrain/gate.py: pass iff every suite is within budget and the new task beat its step-0 value."""

from distrib_ft.retrain.gate import gate
from distrib_ft.retrain.pipeline import _rebased


def suite(baseline, values, rel=0.1, within=None, budget=True):
    evals = []
    for step, v in values:
        ok = within if within is not None else v <= baseline * (1 + rel)
        evals.append({"step": step, "value": v, "delta": v - baseline, "relative": v / baseline - 1,
                      "within_budget": ok})
    su = {"metric": "nll", "kind": "loss", "baseline": baseline, "evaluations": evals}
    if budget:
        su["budget"] = {"max_relative_increase": rel, "max_absolute_drop": None, "max_value": None}
    return su


def report(suites, new, chosen=6):
    base, values = new
    return {"decision": "accepted", "exit_code": 0, "chosen_step": chosen, "suites": suites,
            "new_task": {"metric": "nll", "kind": "loss", "baseline": base,
                         "evaluations": [{"step": s, "value": v} for s, v in values], "gain": None}}


def test_pass():
    r = gate(report({"r1": suite(2.0, [(0, 2.0), (6, 2.1)])}, (3.0, [(0, 3.0), (6, 2.5)])), 0.1)
    assert r.passed and r.reason == "" and r.step == 6 and r.improved
    assert r.suites["r1"]["value"] == 2.1 and r.suites["r1"]["within_budget"] is True
    assert r.new_task == {"metric": "nll", "baseline": 3.0, "value": 2.5, "improved": True, "step": 6}


def test_a_suite_over_budget_refuses_and_names_it():
    r = gate(report({"r1": suite(2.0, [(0, 2.0), (6, 2.3)]), "r2": suite(1.0, [(0, 1.0), (6, 1.01)])},
                    (3.0, [(0, 3.0), (6, 2.5)])), 0.1)
    assert not r.passed and r.breached == ["r1"] and r.improved
    assert r.reason == "r1 over budget (nll 2.0000 -> 2.3000 > limit 2.2000)"


def test_the_new_task_must_improve():
    r = gate(report({"r1": suite(2.0, [(0, 2.0), (6, 2.0)])}, (3.0, [(0, 3.0), (6, 3.0)])), 0.1)
    assert not r.passed and not r.improved
    assert r.reason == "new task not better than at its start (nll 3.0000 -> 3.0000)"
    r = gate({"suites": {}, "new_task": None, "chosen_step": 6}, 0.1)
    assert not r.passed and "no new-task evaluation" in r.reason


def test_reads_the_chosen_step_else_the_last_evaluation():
    suites = {"r1": suite(2.0, [(0, 2.0), (3, 2.1), (6, 2.5)])}  # breached at the end, fine at step 3
    new = (3.0, [(0, 3.0), (3, 2.8), (6, 2.4)])
    assert gate(report(suites, new, chosen=3), 0.1).passed  # the monitor's rollback chose step 3
    last = gate(report(suites, new, chosen=None), 0.1)  # a rejected run: no chosen step
    assert not last.passed and last.step == 6 and last.breached == ["r1"]


def test_a_suite_without_budget_never_refuses_and_budget_fills_a_missing_record():
    unbudgeted = suite(2.0, [(0, 2.0), (6, 9.0)], within=True)
    unbudgeted["budget"] = {"max_relative_increase": None, "max_absolute_drop": None, "max_value": None}
    assert gate(report({"general": unbudgeted}, (3.0, [(0, 3.0), (6, 2.0)])), 0.1).passed
    bare = suite(2.0, [(0, 2.0), (6, 2.3)], budget=False)
    for e in bare["evaluations"]:
        e["within_budget"] = None  # no verdict in the record: the pipeline's retention_budget judges it
    assert not gate(report({"r1": bare}, (3.0, [(0, 3.0), (6, 2.0)])), 0.1).passed
    assert gate(report({"r1": bare}, (3.0, [(0, 3.0), (6, 2.0)])), 0.2).passed


def test_merge_back_candidate_judged_against_the_rounds_own_baselines():
    """An interpolated model's eval report (its step 0 = the base model) is judged on the round's step-0 values."""
    round_report = report({"r1": suite(2.0, [(0, 2.0), (6, 2.6)])}, (3.0, [(0, 3.0), (6, 2.0)]))
    round_report["decision"], round_report["chosen_step"] = "rejected", None
    evaluated = report({"r1": suite(5.0, [(0, 5.0), (1, 2.15)])}, (6.0, [(0, 6.0), (1, 2.9)]), chosen=1)
    r = gate(_rebased(round_report, evaluated), 0.1)
    assert r.passed and r.suites["r1"]["baseline"] == 2.0 and r.suites["r1"]["value"] == 2.15
    assert r.new_task["baseline"] == 3.0 and r.new_task["value"] == 2.9
    evaluated["suites"]["r1"]["evaluations"][-1]["value"] = 2.25  # > 2.0 * 1.1
    assert gate(_rebased(round_report, evaluated), 0.1).breached == ["r1"]
