"""The gate before promotion: may a round's model replace the one in production? A pure function of report.json.

PASS iff, at the report's ``chosen_step`` (else its last evaluation), every retention suite is within its budget
and the new task is better than at step 0 (the model the round started from). The report is the forgetting
monitor's (distrib_ft/monitor/report.py's schema: ``suites`` with ``baseline`` and ``evaluations``, ``new_task``
with ``baseline`` and ``evaluations``); a suite's budget is its own (``within_budget``); ``budget`` (the pipeline's
``retention_budget``) judges a loss suite the report left without a verdict. Issue 12, Must have 3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GateResult:
    """The gate's decision and the numbers it read.

    ``suites``: name -> {metric, baseline, value, limit, within_budget}; ``new_task``: {baseline, value, improved}
    (None when the report has no new task); ``reason``: one line (empty when passed).
    """

    passed: bool
    reason: str
    step: int | None
    suites: dict = field(default_factory=dict)
    new_task: dict | None = None

    @property
    def breached(self) -> list[str]:
        """Names of the suites out of budget."""
        return [n for n, s in self.suites.items() if s["within_budget"] is False]

    @property
    def improved(self) -> bool:
        """Whether the new task is better than at its start."""
        return bool(self.new_task and self.new_task["improved"])

    def as_dict(self) -> dict:
        return asdict(self)


def _at(evaluations: list[dict], step: int | None) -> dict | None:
    if not evaluations:
        return None
    return next((e for e in evaluations if e.get("step") == step), evaluations[-1])


def _limit(su: dict, budget: float) -> float | None:
    """The suite's worst allowed value: its own budget; ``budget`` only for a loss suite with no budget record."""
    base = su.get("baseline")
    if base is None:
        return None
    if "budget" not in su:
        return base * (1 + budget) if su.get("kind", "loss") == "loss" else None
    b = su.get("budget") or {}
    if b.get("max_value") is not None:
        return b["max_value"]
    if su.get("kind", "loss") == "loss" and b.get("max_relative_increase") is not None:
        return base * (1 + b["max_relative_increase"])
    if su.get("kind") == "score" and b.get("max_absolute_drop") is not None:
        return base - b["max_absolute_drop"]
    return None  # a suite measured without a budget


def gate(report: dict, budget: float) -> GateResult:
    """Judge a round's report.json.

    Args:
        report: report.json of the round's job (or of an eval job of a merge-back candidate: step 1).
        budget: the pipeline's retention_budget, for a loss suite whose evaluation carries no ``within_budget``.

    Returns:
        A :class:`GateResult`; ``reason`` names every breached suite with its numbers, or the new task's.
    """
    step = report.get("chosen_step")
    suites: dict = {}
    for name, su in (report.get("suites") or {}).items():
        at = _at(su.get("evaluations") or [], step)
        limit = _limit(su, budget)
        value = at.get("value") if at else None
        ok = at.get("within_budget") if at else None
        if ok is None and value is not None and limit is not None:
            ok = value <= limit if su.get("kind", "loss") == "loss" else value >= limit
        suites[name] = {"metric": su.get("metric"), "baseline": su.get("baseline"), "value": value, "limit": limit,
                        "within_budget": ok, "step": at.get("step") if at else None}
    nt = report.get("new_task")
    new_task = None
    if nt:
        at = _at(nt.get("evaluations") or [], step)
        value = at.get("value") if at else None
        base = nt.get("baseline")
        lower = nt.get("kind", "loss") == "loss"
        improved = value is not None and base is not None and (value < base if lower else value > base)
        new_task = {"metric": nt.get("metric"), "baseline": base, "value": value, "improved": improved,
                    "step": at.get("step") if at else None}
    if step is None:
        steps = [s["step"] for s in suites.values() if s["step"] is not None]
        step = (new_task or {}).get("step") if new_task and new_task.get("step") is not None else \
            (max(steps) if steps else None)
    problems = []
    for name, s in suites.items():
        if s["within_budget"] is False:
            limit = f" > limit {s['limit']:.4f}" if s["limit"] is not None else ""
            problems.append(f"{name} over budget ({s['metric']} {_num(s['baseline'])} -> {_num(s['value'])}{limit})")
    if new_task is None:
        problems.append("no new-task evaluation in the report (data.eval_files)")
    elif not new_task["improved"]:
        problems.append(f"new task not better than at its start ({new_task['metric'] or 'nll'} "
                        f"{_num(new_task['baseline'])} -> {_num(new_task['value'])})")
    return GateResult(passed=not problems, reason="; ".join(problems), step=step, suites=suites, new_task=new_task)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"
