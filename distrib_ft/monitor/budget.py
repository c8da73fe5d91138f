"""The forgetting monitor's arithmetic: baselines, budgets, breaches, early stopping, the checkpoint chosen.

Conventions: a suite's *baseline* is its value at step 0, before any update. For a loss metric (lower is
better) the budget is ``value <= baseline * (1 + max_relative_increase)``; for a score metric (higher is
better) ``value >= baseline - max_absolute_drop``. A suite without a budget is measured, never breached.
The new task's held-out loss decides between checkpoints within budget (lower is better).

Decisions (``report.json``), and the exit code a scheduler acts on:
    accepted     the final model is within every budget                                   exit 0
    stopped      policy=stop: a breach ended the run; final/ = last checkpoint in budget   exit 0
    rolled_back  policy=rollback: final/ = the checkpoint within every budget with the     exit 0
                 lowest new-task loss (the latest one without data.eval_files)
    rejected     no update stayed within the budget (step 0, the untouched start, never    exit 3 (EXIT_BUDGET)
                 counts once a step ran)
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_BUDGET = 3


@dataclass
class Suite:
    name: str
    metric: str
    kind: str  # "loss" | "score"
    max_relative_increase: float | None = None
    max_absolute_drop: float | None = None
    max_value: float | None = None  # an absolute ceiling (kl_to_base's budget), whatever the baseline
    baseline: float | None = None
    evaluations: list[dict] = field(default_factory=list)

    def limit(self) -> float | None:
        if self.max_value is not None:
            return self.max_value
        if self.baseline is None:
            return None
        if self.kind == "loss" and self.max_relative_increase is not None:
            return self.baseline * (1 + self.max_relative_increase)
        if self.kind == "score" and self.max_absolute_drop is not None:
            return self.baseline - self.max_absolute_drop
        return None

    def within(self, value: float) -> bool:
        lim = self.limit()
        if lim is None:
            return True
        return value <= lim if self.kind == "loss" else value >= lim


class Monitor:
    """Feed it every evaluation with :meth:`record`; ask it whether to stop and which step to keep.

    Args:
        suites: the retention suites (their budgets; baselines are set by the first record).
        policy: report | stop | rollback.
        patience: early stopping after this many evaluations without new-task improvement (0: off).
        min_delta: the smallest new-task loss decrease that counts as improvement.
    """

    def __init__(self, suites: list[Suite], *, policy: str = "report", patience: int = 0, min_delta: float = 0.0):
        self.suites = {s.name: s for s in suites}
        self.policy, self.patience, self.min_delta = policy, patience, min_delta
        self.new_task: Suite | None = None
        self.breaches: list[dict] = []
        self.steps: list[int] = []
        self._best_new, self._stale = None, 0

    def record(self, step: int, values: dict[str, float], new_task_loss: float | None = None) -> list[dict]:
        """Add one evaluation (suite name -> value); returns the breaches at this step."""
        self.steps.append(step)
        breaches = []
        for name, suite in self.suites.items():
            value = values[name]
            if suite.baseline is None:
                suite.baseline = value
            ok = suite.within(value)
            delta = value - suite.baseline
            suite.evaluations.append({"step": step, "value": value, "delta": delta,
                                      "relative": delta / suite.baseline if suite.baseline else None,
                                      "within_budget": ok})
            if not ok:
                breaches.append({"step": step, "suite": name, "value": value, "limit": suite.limit()})
        self.breaches += breaches
        if new_task_loss is not None:
            if self.new_task is None:
                self.new_task = Suite("new_task", "nll", "loss", baseline=new_task_loss)
            self.new_task.evaluations.append({"step": step, "value": new_task_loss,
                                              "delta": new_task_loss - self.new_task.baseline})
            if self._best_new is None or new_task_loss < self._best_new - self.min_delta:
                self._best_new, self._stale = new_task_loss, 0
            else:
                self._stale += 1
        return breaches

    def state_dict(self) -> dict:
        """Everything recorded so far, for checkpoints (a resumed run keeps its baselines)."""
        return {"suites": {n: {"baseline": s.baseline, "evaluations": s.evaluations} for n, s in self.suites.items()},
                "new_task": None if self.new_task is None else {"baseline": self.new_task.baseline,
                                                                "evaluations": self.new_task.evaluations},
                "breaches": self.breaches, "steps": self.steps, "best_new": self._best_new, "stale": self._stale}

    def load_state_dict(self, state: dict) -> None:
        for n, s in state["suites"].items():
            if n in self.suites:
                self.suites[n].baseline, self.suites[n].evaluations = s["baseline"], s["evaluations"]
        if state["new_task"] is not None:
            self.new_task = Suite("new_task", "nll", "loss", baseline=state["new_task"]["baseline"],
                                  evaluations=state["new_task"]["evaluations"])
        self.breaches, self.steps = state["breaches"], state["steps"]
        self._best_new, self._stale = state["best_new"], state["stale"]

    def within_budget(self, step: int) -> bool:
        return all(e["within_budget"] for s in self.suites.values() for e in s.evaluations if e["step"] == step)

    def should_stop(self) -> str | None:
        """A reason to end the run now, or None."""
        if self.policy == "stop" and self.breaches and self.breaches[-1]["step"] == self.steps[-1]:
            b = self.breaches[-1]
            return (f"forgetting budget breached at step {b['step']}: {b['suite']} = {b['value']:.4g} "
                    f"(limit {b['limit']:.4g})")
        if self.patience and self._stale >= self.patience:
            return f"new-task loss has not improved for {self._stale} evaluations (early stopping)"
        return None

    def new_task_loss(self, step: int) -> float | None:
        if self.new_task is None:
            return None
        return next((e["value"] for e in self.new_task.evaluations if e["step"] == step), None)

    def choose(self, final_step: int, checkpoint_steps: list[int]) -> tuple[int | None, str]:
        """(the step whose weights become final/, the decision).

        ``checkpoint_steps``: steps that can be restored (the final step's weights are in memory and always count).
        """
        available = set(checkpoint_steps) | {final_step}
        # Step 0 is the untouched start: choosing it would keep no update, so it never qualifies once a step ran.
        ok = [s for s in self.steps if s in available and self.within_budget(s) and (s > 0 or final_step == 0)]
        if final_step in ok and self.policy != "rollback" and not self.breaches:
            return final_step, "accepted"
        if not ok:
            return None, "rejected"
        if self.policy == "rollback":
            best = min(ok, key=lambda s: (self.new_task_loss(s) if self.new_task_loss(s) is not None else 0, -s))
            return best, "accepted" if best == final_step else "rolled_back"
        if self.policy == "stop":
            return max(ok), "stopped" if self.breaches else "accepted"
        return (final_step, "accepted") if final_step in ok else (None, "rejected")

    def report(self, chosen: int | None, decision: str, notes: list[str] | None = None) -> dict:
        """The report dict (the schema distrib_ft.monitor.report writes)."""
        suites = {n: {"metric": s.metric, "kind": s.kind,
                      "budget": {"max_relative_increase": s.max_relative_increase,
                                 "max_absolute_drop": s.max_absolute_drop, "max_value": s.max_value},
                      "baseline": s.baseline, "evaluations": s.evaluations} for n, s in self.suites.items()}
        new_task = None
        if self.new_task is not None:
            final = self.new_task_loss(chosen) if chosen is not None else self.new_task.evaluations[-1]["value"]
            new_task = {"metric": "nll", "kind": "loss", "baseline": self.new_task.baseline,
                        "evaluations": self.new_task.evaluations, "gain": self.new_task.baseline - final}
        return {"decision": decision, "exit_code": EXIT_BUDGET if decision == "rejected" else 0,
                "chosen_step": chosen, "policy": self.policy, "suites": suites, "new_task": new_task,
                "breaches": self.breaches, "notes": notes or []}


def is_eval_step(step: int, *, eval_at: list[int], eval_steps: int, max_steps: int) -> bool:
    """Evaluations: the listed early steps, every eval_steps, and the end."""
    return step in eval_at or (eval_steps > 0 and step % eval_steps == 0) or step == max_steps
