"""The monitor's arithmetic: baselines, budgets, breaches, stop / rollback decisions, early stopping."""

import pytest

from distrib_ft.monitor.budget import EXIT_BUDGET, Monitor, Suite, is_eval_step


def mon(policy="report", patience=0):
    return Monitor([Suite("qa", "nll", "loss", max_relative_increase=0.10),
                    Suite("mc", "multiple_choice", "score", max_absolute_drop=0.05),
                    Suite("free", "nll", "loss")], policy=policy, patience=patience)


def feed(m, rows):
    for step, qa, mc, new in rows:
        m.record(step, {"qa": qa, "mc": mc, "free": 1.0 + step}, new)


def test_baseline_deltas_and_budget_limits():
    m = mon()
    feed(m, [(0, 2.0, 0.80, 3.0), (5, 2.2, 0.75, 2.0), (10, 2.21, 0.75, 1.5)])
    qa = m.suites["qa"]
    assert qa.baseline == 2.0 and abs(qa.limit() - 2.2) < 1e-12
    assert [e["within_budget"] for e in qa.evaluations] == [True, True, False]
    assert abs(qa.evaluations[1]["relative"] - 0.1) < 1e-12
    assert abs(m.suites["mc"].limit() - 0.75) < 1e-12 and m.within_budget(5)
    assert not m.within_budget(10)
    assert m.breaches == [{"step": 10, "suite": "qa", "value": 2.21, "limit": qa.limit()}]
    assert all(e["within_budget"] for e in m.suites["free"].evaluations)  # no budget, never breached


def test_report_policy_accepts_or_rejects_the_final_model():
    m = mon()
    feed(m, [(0, 2.0, 0.8, 3.0), (5, 2.1, 0.8, 2.0)])
    assert m.choose(5, []) == (5, "accepted")
    feed(m, [(10, 2.5, 0.8, 1.0)])
    chosen, decision = m.choose(10, [5])
    assert (chosen, decision) == (None, "rejected")
    assert m.report(chosen, decision)["exit_code"] == EXIT_BUDGET


def test_stop_policy_stops_and_keeps_the_last_checkpoint_in_budget():
    m = mon("stop")
    feed(m, [(0, 2.0, 0.8, 3.0), (5, 2.1, 0.8, 2.0)])
    assert m.should_stop() is None
    feed(m, [(10, 2.0, 0.70, 1.0)])  # the score suite drops 0.10 > 0.05
    assert "mc" in m.should_stop()
    assert m.choose(10, [0, 5]) == (5, "stopped")
    assert m.report(5, "stopped")["exit_code"] == 0


def test_rollback_picks_the_best_new_task_loss_within_budget():
    m = mon("rollback")
    feed(m, [(0, 2.0, 0.8, 3.0), (5, 2.1, 0.8, 2.0), (10, 2.15, 0.8, 1.5), (15, 3.0, 0.8, 0.5), (20, 2.1, 0.8, 1.8)])
    assert m.should_stop() is None  # rollback carries on
    assert m.choose(20, [0, 5, 10, 15]) == (10, "rolled_back")
    rep = m.report(10, "rolled_back")
    assert rep["new_task"]["gain"] == 3.0 - 1.5 and rep["chosen_step"] == 10
    assert m.choose(20, [0]) == (20, "accepted")  # the final model itself is the best one within budget


def test_nothing_in_budget_is_rejected():
    m = mon("rollback")
    feed(m, [(0, 2.0, 0.8, 3.0), (5, 9.0, 0.8, 2.0)])
    m.suites["qa"].evaluations[0]["within_budget"] = False  # e.g. a checkpoint that could not be restored
    assert m.choose(5, [0]) == (None, "rejected")


def test_early_stopping_on_a_new_task_plateau():
    m = Monitor([], patience=2, min_delta=0.01)
    for step, loss in [(0, 3.0), (5, 2.0), (10, 1.995), (15, 2.1)]:
        m.record(step, {}, loss)
    assert "early stopping" in m.should_stop()


def test_eval_schedule_is_dense_early():
    steps = [s for s in range(0, 101) if is_eval_step(s, eval_at=[0, 5, 10, 25, 50], eval_steps=40, max_steps=100)]
    assert steps == [0, 5, 10, 25, 40, 50, 80, 100]


@pytest.mark.parametrize("policy", ["stop", "rollback", "report"])
def test_a_run_that_kept_no_update_is_rejected(policy):
    """Step 0 (the untouched start) is within budget by definition; when every later evaluation breaches,
    the run produced nothing: rejected, exit code 3 (it used to end 'stopped'/'rolled_back' with the base)."""
    m = mon(policy)
    feed(m, [(0, 2.0, 0.8, 3.0), (5, 2.5, 0.8, 2.0), (10, 2.6, 0.8, 1.5)])
    assert m.choose(10, [0, 5]) == (None, "rejected")
    assert m.report(None, "rejected")["exit_code"] == EXIT_BUDGET
    start_only = Monitor([])
    start_only.record(0, {})
    assert start_only.choose(0, [0]) == (0, "accepted")  # a run of no steps keeps its start


def test_kl_to_base_budget_is_an_absolute_ceiling():
    m = Monitor([Suite("kl_to_base", "kl", "loss", max_value=0.1)], policy="report")
    m.record(0, {"kl_to_base": 0.0}, 3.0)
    m.record(5, {"kl_to_base": 0.05}, 2.0)
    assert m.choose(5, []) == (5, "accepted")
    m.record(10, {"kl_to_base": 0.3}, 1.0)
    assert m.breaches[-1] == {"step": 10, "suite": "kl_to_base", "value": 0.3, "limit": 0.1}
    assert m.choose(10, []) == (None, "rejected")
    assert m.report(None, "rejected")["suites"]["kl_to_base"]["budget"]["max_value"] == 0.1
