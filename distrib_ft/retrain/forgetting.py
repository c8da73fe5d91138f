"""Forgetting across the rounds of a retraining pipeline: the matrix R, GEM's ACC / BWT / FWT, and the report.

R and its three metrics follow GEM (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning",
NeurIPS, https://arxiv.org/abs/1706.08840: ACC, BWT, FWT; the same differences as its released metrics/metrics.py,
github.com/facebookresearch/GradientEpisodicMemory, which however averages BWT and FWT over T terms one of which is
0, where the paper, and this module, divide by T-1). Tasks are the rounds' held-out sets in round order; ``R[i][j]``
is task j's metric for the model current after round i (round i trains task i); ``base[j]`` is the base model's
(GEM's ``b̄_j``, there the model at random initialisation). With T rows evaluated (T <= the number of tasks)::

    ACC = 1/T     sum_{j=0..T-1} R[T-1][j]                  (the last model on every task trained so far)
    BWT = 1/(T-1) sum_{j=0..T-2} (R[T-1][j] - R[j][j])      (GEM: accuracy; > 0 means later rounds helped)
    FWT = 1/(T-1) sum_{j=1..T-1} (R[j-1][j] - base[j])      (GEM: accuracy; > 0 means earlier rounds helped)

Signs for a metric where lower is better (NLL, the pipeline's metric): BWT and FWT are negated, i.e.
``BWT = 1/(T-1) sum (R[j][j] - R[T-1][j])`` and ``FWT = 1/(T-1) sum (base[j] - R[j-1][j])``, so that, as in GEM with
accuracy, a positive value means better and a negative BWT is forgetting (in NLL units). ACC is not negated: it
is the mean NLL (lower is better). T = 1: ACC = R[0][0]; BWT and FWT are None (GEM's 1/(T-1) has no term: nothing
trained before, nothing to forget). A metric any of whose terms needs an entry that is None (not evaluated) is
None itself (not an average over fewer terms, which would be another quantity); the entries are listed in
``missing``. Only the last row, the diagonal R[j][j] and the cells just above it R[j-1][j] enter the metrics; the
other entries are in the report (table, plots) only.

``write_report(registry, matrix)`` writes, each file atomically (a local temp file then a rename; on a URL one
object PUT, distrib_ft/runtime/storage.py), the plots first and the JSON last::

    REGISTRY/pipeline_report/R_heatmap.png            R with the base row: value in each cell, colour = change
                                                      from the base model (red worse, green better)
    REGISTRY/pipeline_report/tasks_across_rounds.png  one line per task: x = base, r1, r2, ...; y = the metric
    REGISTRY/pipeline_report.md                       metrics, the table, the rounds, the two plots
    REGISTRY/pipeline_report.json                     R, ACC, BWT, FWT, T, tasks, rounds, base, metric, ... and
                                                      every other key of ``matrix`` (exit_code, current, ...)

Plots use matplotlib's object-oriented API with the Agg canvas (``matplotlib.figure.Figure`` +
``backends.backend_agg.FigureCanvasAgg``, as matplotlib's "Embedding in a web application server" example does:
https://matplotlib.org/stable/gallery/user_interfaces/web_application_server_sgskip.html), imported lazily so that
:func:`gem_metrics` costs no matplotlib import and no global pyplot state is touched.
"""

from __future__ import annotations

import io
import json
import math
import os
from numbers import Real

from distrib_ft.runtime.storage import UrlPath, as_path, atomic_write_bytes, atomic_write_text

REPORT_JSON = "pipeline_report.json"
REPORT_MD = "pipeline_report.md"
PLOTS_DIR = "pipeline_report"
HEATMAP = "R_heatmap.png"
LINES = "tasks_across_rounds.png"


# ---------------------------------------------------------------------------------------------------- metrics


def gem_metrics(R: list[list[float | None]], base: list[float | None], *, lower_is_better: bool = True) -> dict:
    """GEM's ACC, BWT and FWT of a round x task matrix (definitions and signs: the module docstring).

    Args:
        R: ``R[i][j]``: task j's metric for the model after round i; T rows (the rounds done), one entry per task
            (tasks in round order, future rounds' tasks included), None where not evaluated.
        base: ``base[j]``: the base model's metric on task j (None where not evaluated).
        lower_is_better: True for NLL: BWT and FWT are negated so that positive means better.

    Returns:
        ``{"ACC": float|None, "BWT": float|None, "FWT": float|None, "T": int, "lower_is_better": bool,
        "missing": ["R[2][0]", "base[1]", ...]}`` (missing: the None entries that a metric needed).

    Raises:
        ValueError: a row of another length than ``base``, more rows than tasks, or an entry that is not a number.
    """
    rows, base = [list(r) for r in R], list(base)
    T, n = len(rows), len(base)
    for j, v in enumerate(base):
        _check_entry(v, f"base[{j}]")
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(f"R[{i}] has {len(row)} entries but there are {n} tasks (len(base)); give one entry "
                             "per task, None where not evaluated")
        for j, v in enumerate(row):
            _check_entry(v, f"R[{i}][{j}]")
    if T > n:
        raise ValueError(f"R has {T} rows but only {n} tasks: row i is the model after round i, which trains task i")
    sign = -1.0 if lower_is_better else 1.0  # GEM's differences are "later minus earlier"; negated for NLL
    missing: list[str] = []

    def entry(i: int | None, j: int) -> tuple[str, float | None]:
        return (f"base[{j}]", base[j]) if i is None else (f"R[{i}][{j}]", rows[i][j])

    def mean(terms: list[tuple[tuple[str, float | None], ...]]) -> float | None:
        """Mean over terms of one value, or of sign * (later - earlier); None when a term's entry is None."""
        gaps = [name for t in terms for name, v in t if v is None]
        if gaps:
            missing.extend(g for g in gaps if g not in missing)
            return None
        return math.fsum(t[0][1] if len(t) == 1 else sign * (t[0][1] - t[1][1]) for t in terms) / len(terms)

    acc = bwt = fwt = None
    if T:
        acc = mean([(entry(T - 1, j),) for j in range(T)])
    if T > 1:
        bwt = mean([(entry(T - 1, j), entry(j, j)) for j in range(T - 1)])  # GEM: R[T-1][j] - R[j][j]
        fwt = mean([(entry(j - 1, j), entry(None, j)) for j in range(1, T)])  # GEM: R[j-1][j] - base[j]
    return {"ACC": acc, "BWT": bwt, "FWT": fwt, "T": T, "lower_is_better": lower_is_better, "missing": missing}


def _check_entry(v, name: str) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, Real)):
        raise ValueError(f"{name} = {v!r}: an entry of R / base is a number or None (not evaluated)")


def row_from_eval_report(report: dict, tasks: list[str]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """(base scores, model scores) of one eval job's report.json whose suites are the tasks (``distrib-ft eval``).

    An eval job evaluates the base model at step 0 (each suite's ``baseline``) and the model at step 1 (its last
    evaluation), so one job gives a row of R and the base row. A task that is not a suite of the report is None.
    """
    base, scores = {}, {}
    for task in tasks:
        suite = (report.get("suites") or {}).get(task)
        evals = sorted((suite or {}).get("evaluations") or [], key=lambda e: e["step"])
        base[task] = suite.get("baseline") if suite else None
        scores[task] = evals[-1]["value"] if evals else None
    return base, scores


# ----------------------------------------------------------------------------------------------------- report


def write_report(registry, matrix: dict) -> dict:
    """Write REGISTRY/pipeline_report.json and .md with the two PNGs (the module docstring), atomically.

    Args:
        registry: the registry's folder or URL (a str, Path, UrlPath, or a :class:`distrib_ft.registry.Registry`).
        matrix: ``{"metric": "nll", "tasks": [round names, in order], "base": {task: value},
            "rows": [{"round": name, "version": "v0001", "scores": {task: value}}, ...]}``: row i is the model
            current after round i = ``tasks[i]``; a task missing from ``scores`` is None (not evaluated). Optional
            ``lower_is_better`` (default: metric == "nll"). Every other key (``exit_code``, ``current``,
            ``rounds`` with each round's decision and verdict, ...) is written to the JSON as given.

    Returns:
        The dict written to pipeline_report.json: ``matrix``'s keys plus R (rows x tasks, None where not
        evaluated), ACC, BWT, FWT, T, missing, lower_is_better, base (``{task: value}``), rounds (``matrix``'s, else
        ``[{name, version}]`` of the rows). NaN and inf are None in it (strict JSON has neither; the .md shows them).

    Raises:
        ValueError: a malformed matrix (missing key, duplicate task, a row whose round is not the task at its
            position), one line.
    """
    if not isinstance(registry, (str, os.PathLike, UrlPath)):  # a Registry (a Path's .root is "/")
        registry = registry.root
    root = as_path(registry)
    for key in ("metric", "tasks", "base", "rows"):
        if key not in matrix:
            raise ValueError(f"{REPORT_JSON}: the matrix has no {key!r} (keys: metric, tasks, base, rows)")
    tasks, rows, metric = [str(t) for t in matrix["tasks"]], list(matrix["rows"]), str(matrix["metric"])
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{REPORT_JSON}: tasks {tasks} name a round twice; one task per round")
    for i, row in enumerate(rows):
        name = row.get("round")
        if i >= len(tasks) or name != tasks[i]:
            want = repr(tasks[i]) if i < len(tasks) else "none (more rows than tasks)"
            raise ValueError(f"{REPORT_JSON}: rows[{i}] is round {name!r} but task {i} is {want}; give one row per "
                             "round done, in the order of tasks")
    lower = bool(matrix.get("lower_is_better", metric == "nll"))
    R = [[_num((row.get("scores") or {}).get(t)) for t in tasks] for row in rows]
    base = [_num((matrix["base"] or {}).get(t)) for t in tasks]
    gem = gem_metrics(R, base, lower_is_better=lower)
    rounds = matrix.get("rounds") or [{"name": row["round"], "version": row.get("version")} for row in rows]
    out = {**matrix, "metric": metric, "tasks": tasks, "rounds": rounds, "base": dict(zip(tasks, base)), "R": R,
           **gem}
    labels = ["base"] + [f"{row['round']} ({row['version']})" if row.get("version") else str(row["round"])
                         for row in rows]
    plots = root / PLOTS_DIR
    _write_png(plots / HEATMAP, heatmap_figure(R, base, tasks, labels, metric, lower))
    _write_png(plots / LINES, lines_figure(R, base, tasks, labels, metric, lower))
    atomic_write_text(root / REPORT_MD, render_markdown(out, [("R heatmap", f"{PLOTS_DIR}/{HEATMAP}"),
                                                              ("each task across rounds", f"{PLOTS_DIR}/{LINES}")]))
    out = _finite(out)
    atomic_write_text(root / REPORT_JSON, json.dumps(out, indent=2) + "\n")
    return out


def render_markdown(report: dict, plots: list[tuple[str, str]] = ()) -> str:
    """The human report of a pipeline_report.json dict; ``plots``: (caption, path relative to the .md) pairs."""
    tasks, R, T, metric = report["tasks"], report["R"], report["T"], report["metric"]
    lower, base = report["lower_is_better"], report["base"]
    better = "lower" if lower else "higher"
    last = report["rows"][-1]["round"] if report.get("rows") else None
    lines = ["# Forgetting across rounds", ""]
    if "exit_code" in report or "current" in report:
        lines += [f"Pipeline exit code {report.get('exit_code', '-')}; current version "
                  f"{report.get('current') or 'none'}.", ""]
    lines += [f"R[i][j] = {metric} ({better} is better) of task j (round j's held-out set) for the model current "
              f"after round i; T = {T} round(s) evaluated. Definitions: GEM (Lopez-Paz & Ranzato 2017)"
              + ("; BWT and FWT negated for a lower-is-better metric, so positive means better." if lower else "."),
              ""]
    sign = "R[j][j] - R[T-1][j]" if lower else "R[T-1][j] - R[j][j]"
    fsign = "base[j] - R[j-1][j]" if lower else "R[j-1][j] - base[j]"
    lines += [f"- **ACC** = {_f(report['ACC'])}: mean {metric} of the model after {last or '-'} on the tasks of the "
              f"rounds done ({better} is better)",
              f"- **BWT** = {_s(report['BWT'])}: mean of {sign} over earlier tasks (negative = forgetting)",
              f"- **FWT** = {_s(report['FWT'])}: mean of {fsign} over tasks 1..T-1 (positive = earlier rounds "
              "helped a task before it was trained)"]
    if report.get("missing"):
        lines.append(f"- not evaluated, so a metric is n/a: {', '.join(report['missing'])}")
    lines += ["", "## R", "", "| model | " + " | ".join(_cell(t) for t in tasks) + " |",
              "|---|" + "---|" * len(tasks),
              "| base | " + " | ".join(_f(base.get(t)) for t in tasks) + " |"]
    for i, row in enumerate(report.get("rows") or []):
        label = f"after {row['round']}" + (f" ({row['version']})" if row.get("version") else "")
        cells = [f"**{_f(v)}**" if j == i and v is not None else _f(v) for j, v in enumerate(R[i])]
        lines.append(f"| {_cell(label)} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: the task the round trained on (R[j][j]). Down a column: one task across rounds; "
              f"{'a rise' if lower else 'a drop'} after its bold cell is forgetting.", ""]
    rounds = [r for r in report.get("rounds") or [] if isinstance(r, dict) and "decision" in r]
    if rounds:
        lines += ["## Rounds", "", "| round | version | decision | verdict |", "|---|---|---|---|"]
        lines += [f"| {_cell(r.get('name'))} | {_cell(r.get('version') or '-')} | {_cell(r.get('decision'))} | "
                  f"{_cell(r.get('verdict') or '-')} |" for r in rounds]
        lines.append("")
    if plots:
        lines += ["## Plots", "", *[f"![{k}]({p})" for k, p in plots], ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------------ plots


def heatmap_figure(R, base, tasks: list[str], labels: list[str], metric: str, lower_is_better: bool = True):
    """A matplotlib Figure of R with the base row on top (rows: base + rounds; columns: tasks).

    Each cell holds its value (and, below the base row, its change from the base model); its colour is that change
    (red worse, green better; grey: not evaluated or no base value); each round's own task (R[j][j]) is outlined.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import PercentFormatter

    values = [list(base), *[list(r) for r in R]]
    worse = np.full((len(values), len(tasks)), np.nan)  # relative change from base, positive = worse
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            b = base[j]
            if v is not None and b is not None and b != 0 and math.isfinite(v) and math.isfinite(b):
                rel = (v - b) / abs(b)
                worse[i, j] = rel if lower_is_better else -rel
    span = float(np.nanmax(np.abs(worse))) if np.isfinite(worse).any() else 0.0
    span = span or 1e-6
    cmap = colormaps["RdYlGn_r"].with_extremes(bad="lightgrey")
    fig = Figure(figsize=(min(3.0 + 1.4 * len(tasks), 20), min(2.2 + 0.6 * len(values), 14)), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(worse), cmap=cmap, norm=Normalize(-span, span), aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            text = "n/a" if v is None else f"{v:.3f}"
            if i and np.isfinite(worse[i, j]):
                text += f"\n{(1 if lower_is_better else -1) * worse[i, j]:+.1%}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9)
        if i and i - 1 < len(tasks):
            ax.add_patch(Rectangle((i - 1 - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(values)), labels)
    ax.set_xlabel("task (a round's held-out set)")
    ax.set_ylabel("model")
    ax.set_title(f"R: {metric} ({'lower' if lower_is_better else 'higher'} is better); box = the round's own task",
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="change from base (red = worse)", format=PercentFormatter(1.0))
    fig.tight_layout()
    return fig


def lines_figure(R, base, tasks: list[str], labels: list[str], metric: str, lower_is_better: bool = True):
    """A matplotlib Figure with one line per task across the models (x: base, r1, r2, ...; y: the metric).

    A star marks the round that trained the task; None entries are gaps in the line.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    x = list(range(len(R) + 1))
    for j, task in enumerate(tasks):
        y = [math.nan if v is None else v for v in [base[j], *[row[j] for row in R]]]
        (line,) = ax.plot(x, y, "o-", label=task)
        if j < len(R) and R[j][j] is not None:
            ax.plot([j + 1], [R[j][j]], marker="*", markersize=16, color=line.get_color(), markeredgecolor="black",
                    linestyle="none")
    ax.set_xticks(x, labels)
    ax.set(title="each task across rounds (star: the round that trained it)", xlabel="model",
           ylabel=f"{metric} ({'lower' if lower_is_better else 'higher'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9, title="task")
    fig.tight_layout()
    return fig


def _write_png(path, fig) -> None:
    """Render ``fig`` with the Agg canvas and write it atomically (local temp file + rename; a URL: one PUT)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------- helpers


def _num(v) -> float | None:
    if v is None:
        return None
    _check_entry(v, "a score")
    return float(v)


def _finite(obj):
    """``obj`` with NaN / inf floats as None (strict JSON has neither; the .md shows them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if abs(v) < 1e6 else f"{v:.4g}"


def _s(v) -> str:
    return "n/a" if v is None else f"{v:+.4f}" if abs(v) < 1e6 else f"{v:+.4g}"


def _cell(v) -> str:
    return str(v).replace("|", "&#124;").replace("\n", " ")
