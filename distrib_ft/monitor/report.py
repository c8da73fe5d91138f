"""The forgetting report: ``report.json`` for a scheduler, ``report.md`` and plots for a person.

``write_report(report, output_dir)`` takes the dict the monitor builds (schema below) and writes,
each file atomically (temp file in the same folder, then a rename)::

    report.json           the dict as given
    report.md             decision first, then the retention and new-task tables, breaches, plots
    plots/<suite>.png     value against step: baseline dotted, budget limit red dashed, breaches
                          marked, the chosen step as a vertical line
    plots/new_task.png    the same for the new task (no budget)

Schema: ``decision`` (accepted | stopped | rolled_back | rejected), ``exit_code``, ``chosen_step``
(int or None), ``policy``, ``suites`` (name -> metric, kind loss|score, budget
{max_relative_increase, max_absolute_drop}, baseline, evaluations [{step, value, delta, relative,
within_budget}]), ``new_task`` (metric, kind, baseline, evaluations, gain; or None), ``breaches``
([{step, suite, value, limit}]) and ``notes`` (list of str).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distrib_ft.runtime.checkpoint import atomic_write_text  # noqa: E402
from distrib_ft.runtime.storage import umask  # noqa: E402

_DECISIONS = {
    "accepted": "**Accepted**{code}: final/ is step {step}; every retention suite within budget",
    "stopped": ("**Stopped**{code}: training stopped when a retention budget was breached; final/ is step {step}, the "
                "last evaluated checkpoint within every budget"),
    "rolled_back": ("**Rolled back**{code}: final/ is step {step}, the checkpoint within every retention budget "
                    "with the lowest new-task eval loss (the latest one when the job has no data.eval_files)"),
    "rejected": ("**Rejected**{code}: no update stayed within the budget: no evaluated checkpoint after step 0 kept "
                 "every retention suite within budget"),
}


def budget_limit(kind: str, baseline: float, budget: dict) -> float | None:
    """The worst value a suite may reach; None without a budget.

    ``baseline * (1 + max_relative_increase)`` for a loss (lower is better), ``baseline - max_absolute_drop`` for
    a score (higher is better).
    """
    if budget.get("max_value") is not None:
        return budget["max_value"]
    if kind == "loss" and budget.get("max_relative_increase") is not None:
        return baseline * (1.0 + budget["max_relative_increase"])
    if kind == "score" and budget.get("max_absolute_drop") is not None:
        return baseline - budget["max_absolute_drop"]
    return None


def write_report(report: dict, output_dir: str | Path) -> list[Path]:
    """Write report.json, report.md and the plots under ``output_dir``.

    Args:
        report: the monitor's report dict (see the module docstring).
        output_dir: the job's output folder; ``plots/`` is created in it.

    Returns:
        The paths written: report.json, report.md, then one PNG per suite and ``new_task.png``.
    """
    out = Path(output_dir)
    json_path, md_path = out / "report.json", out / "report.md"
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    chosen, plots = report.get("chosen_step"), []
    for name, suite in report.get("suites", {}).items():
        limit = budget_limit(suite["kind"], suite["baseline"], suite.get("budget") or {})
        breaches = [b for b in report.get("breaches", []) if b["suite"] == name]
        png = _plot(out / "plots" / f"{_slug(name)}.png", f"retention: {name} ({suite['metric']})", suite, limit,
                    breaches, chosen)
        plots.append((name, png))
    if report.get("new_task"):
        nt = report["new_task"]
        plots.append(("new task", _plot(out / "plots" / "new_task.png", f"new task ({nt['metric']})", nt, None, [],
                                        chosen)))
    atomic_write_text(md_path, render_markdown(report, [(k, p.relative_to(out).as_posix()) for k, p in plots]))
    return [json_path, md_path, *(p for _, p in plots)]


def render_markdown(report: dict, plots: list[tuple[str, str]] = ()) -> str:
    """The human summary. ``plots``: (caption, PNG path relative to report.md) pairs to link."""
    chosen, code = report.get("chosen_step"), report.get("exit_code")
    line = _DECISIONS.get(report["decision"], "**{decision}**{code}").format(
        decision=report["decision"], step=chosen, code=f" (exit code {code})" if code else "")
    lines = ["# Forgetting report", "", line, "", f"Policy: `{report.get('policy')}`; chosen checkpoint: "
             + (f"step {chosen}" if chosen is not None else "none"), ""]
    suites = report.get("suites", {})
    if suites:
        lines += ["## Retention", "", "| suite | metric | baseline | final | change | budget | within budget |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in suites.items():
            e = _final(s["evaluations"], chosen)
            within = "-" if e is None else ("yes" if e.get("within_budget", True) else "**NO**")
            name = name.replace("|", "&#124;")  # keeps the table's columns
            lines.append(f"| {name} | {s['metric']} | {_f(s['baseline'])} | {_at(e)} | {_change(e)} | "
                         f"{_budget(s)} | {within} |")
        lines.append("")
    nt = report.get("new_task")
    if nt:
        e = _final(nt["evaluations"], chosen)
        lines += ["## New task", "", "| metric | baseline | final | gain |", "|---|---|---|---|",
                  f"| {nt['metric']} | {_f(nt['baseline'])} | {_at(e)} | {_signed(nt.get('gain'))} |", ""]
    breaches = report.get("breaches", [])
    lines += ["## Breaches", ""]
    lines += [f"- step {b['step']}: {b['suite']} = {_f(b['value'])} (limit {_f(b['limit'])})" for b in breaches]
    lines += ["- none" if not breaches else "", ""]
    if report.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    if plots:
        lines += ["## Plots", "", *[f"![{k}]({p})" for k, p in plots], ""]
    return "\n".join(x for i, x in enumerate(lines) if x or (i and lines[i - 1])).rstrip() + "\n"


def _plot(path: Path, title: str, series: dict, limit: float | None, breaches: list[dict],
          chosen: int | None) -> Path:
    """One 800x450 PNG of value against step (written atomically)."""
    evals = sorted(series["evaluations"], key=lambda e: e["step"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot([e["step"] for e in evals], [e["value"] for e in evals], "o-", color="tab:blue", label=series["metric"])
    ax.axhline(series["baseline"], color="gray", linestyle=":", linewidth=1.5,
               label=f"baseline {_f(series['baseline'])}")
    if limit is not None:
        ax.axhline(limit, color="red", linestyle="--", linewidth=1.5, label=f"budget limit {_f(limit)}")
    bad = breaches or [e for e in evals if e.get("within_budget") is False]
    if bad:
        ax.scatter([b["step"] for b in bad], [b["value"] for b in bad], marker="x", s=90, color="red", zorder=5,
                   linewidths=2.5, label="breach")
    if chosen is not None:
        ax.axvline(chosen, color="green", linewidth=1.5, alpha=0.8, label=f"chosen: step {chosen}")
    better = "lower" if series.get("kind") == "loss" else "higher"
    ax.set(title=title, xlabel="optimizer step", ylabel=f"{series['metric']} ({better} is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would stay after the rename
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _final(evaluations: list[dict], chosen: int | None) -> dict | None:
    """The evaluation at the chosen step, else the last one."""
    at = [e for e in evaluations if e["step"] == chosen]
    return at[-1] if at else max(evaluations, key=lambda e: e["step"], default=None)


def _budget(suite: dict) -> str:
    b = suite.get("budget") or {}
    parts = []
    if b.get("max_relative_increase") is not None:
        parts.append(f"rise <= {100 * b['max_relative_increase']:.1f}%")
    if b.get("max_absolute_drop") is not None:
        parts.append(f"drop <= {b['max_absolute_drop']:.4g}")
    if b.get("max_value") is not None:
        parts.append(f"<= {b['max_value']:.4g}")
    return ", ".join(parts) or "none"


def _change(e: dict | None) -> str:
    if e is None:
        return "-"
    rel = e.get("relative")
    return _signed(e.get("delta")) + (f" ({100 * rel:+.1f}%)" if rel is not None else "")


def _at(e: dict | None) -> str:
    return "-" if e is None else f"{_f(e['value'])} (step {e['step']})"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.4f}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "suite"
