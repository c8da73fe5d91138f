"""``verdict.json``: what a scheduler reads of a job that ended, beside summary.json in ``training.output_dir``.

One small JSON file, written atomically by the driver (``distrib-ft train``; ``distrib-ft eval`` writes one beside
its report) when the job ends, whatever the outcome (exit 0, 3, 1 or 130; an input error, exit 2, ran nothing and
writes nothing)::

    {"version": 1, "command": "train", "job": "/path/job.yaml", "job_sha256": "...", "output_dir": "...",
     "exit_code": 0, "decision": "accepted", "final": ".../final", "rejected": null, "chosen_step": 4, "steps": 4,
     "metrics": {"eval_loss_start": 2.31, "eval_loss": 1.2,
                 "suites": {"old": {"metric": "nll", "baseline": 2.0, "value": 2.1, "within_budget": true}}},
     "error": null, "started": "2026-...Z", "finished": "2026-...Z", "seconds": 95.2,
     "attempts": [{"started": ..., "finished": ..., "exit_code": 0, "resumed_from": null, "error": null}]}

``decision``: the monitor's (accepted, rolled_back, stopped, rejected), or failed / interrupted. ``job_sha256``
identifies the resolved job (every key but the job file's own path): a second ``distrib-ft train`` of the same job
on a folder whose verdict says it finished does not train again. ``attempts`` lists each submission that worked on
this output_dir for the same job (a resumed run adds one); each submission's ``worker_attempts`` are Ray Train's
restarts of the worker group within it (``distributed.max_failures``, distrib_ft/runtime/recovery.py): per attempt
the checkpoint it resumed from and why it ended, e.g. ``[{"attempt": 1, "resumed_from": null, "step": 0, "error":
"a worker died (rank 1, pid 4242: SIGKILL)"}, {"attempt": 2, "resumed_from": "checkpoints/step-2", "step": 2,
"error": null}]`` (summary.json's ``attempts``; the ledger of Ray's controller when the job failed for good).

``distrib-ft status OUTPUT_DIR`` prints it (:func:`text`) and exits with ``exit_code``. OUTPUT_DIR may be a URL
(s3://, gs://, hdfs://): the verdict is read and written there (distrib_ft/runtime/storage.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

VERDICT = "verdict.json"
VERSION = 1
FINISHED_CODES = (0, 3)  # the job ran to its end: final/ (0) or rejected/ (3)


def now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-11-30T02:45:00Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def job_sha256(config) -> str:
    """The identity of a resolved job: a hash of every key of its config but ``source`` (where the file lay)."""
    data = config.model_dump(mode="json", by_alias=True, exclude={"source"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def suite_metrics(report: dict | None) -> dict:
    """Each retention suite's baseline and its value at the chosen step (the last evaluation when none was chosen)."""
    if not report:
        return {}
    out = {}
    for name, su in report.get("suites", {}).items():
        evals = su.get("evaluations") or []
        at = next((e for e in evals if e["step"] == report.get("chosen_step")), evals[-1] if evals else None)
        out[name] = {"metric": su.get("metric"), "baseline": su.get("baseline"),
                     "value": at["value"] if at else None, "step": at["step"] if at else None,
                     "within_budget": at["within_budget"] if at else None}
    return out


def _new_task(report: dict | None) -> float | None:
    """The new task's value at the chosen step, else at the last evaluation (a rejected run's model: its last step)."""
    report = report or {}
    evals = (report.get("new_task") or {}).get("evaluations") or []
    at = next((e for e in evals if e["step"] == report.get("chosen_step")), evals[-1] if evals else None)
    return at["value"] if at else None


def build(*, command: str, config, output_dir: str | Path, exit_code: int, started: str, began: float,
          summary: dict | None = None, report: dict | None = None, decision: str | None = None,
          error: str | None = None, resumed_from: str | None = None, earlier: dict | None = None,
          worker_attempts: list | None = None) -> dict:
    """The verdict of a job that just ended.

    Args:
        command: ``train`` or ``eval``.
        config: the job's resolved config (its ``source`` and identity are recorded).
        output_dir: where the job wrote; ``final`` / ``rejected`` are looked up there when the summary has none.
        exit_code: the CLI's exit code for this job.
        started: :func:`now` when the command began.
        began: ``time.time()`` when the command began.
        summary: summary.json as a dict, when the job wrote it.
        report: report.json as a dict, when the job wrote it (the suites' values).
        decision: overrides the summary's / report's (``failed``, ``interrupted``).
        error: the first line of the error of a failed job.
        resumed_from: the checkpoint this attempt continued from.
        earlier: the verdict of an earlier attempt of the same job in this folder (its attempts are kept).
        worker_attempts: Ray Train's attempts of the worker group in this submission; default the summary's.
    """
    from distrib_ft.runtime.storage import as_path

    out, summary = as_path(output_dir), summary or {}
    artifact = as_path(summary["final"]) if summary.get("final") else None
    final = str(artifact) if artifact is not None and artifact.name == "final" else None
    rejected = str(artifact) if artifact is not None and artifact.name == "rejected" else None
    if exit_code == 3 and rejected is None and (out / "rejected").exists():
        rejected = str(out / "rejected")
    finished = now()
    attempt = {"started": started, "finished": finished, "exit_code": exit_code, "resumed_from": resumed_from,
               "error": error, "worker_attempts": worker_attempts or summary.get("attempts") or []}
    attempts = [*((earlier or {}).get("attempts") or []), attempt]
    first_line = error.strip().splitlines()[0] if error and error.strip() else error
    attempt["error"] = first_line
    return {
        "version": VERSION, "command": command, "job": config.source, "job_sha256": job_sha256(config),
        "output_dir": str(out), "exit_code": exit_code,
        "decision": decision or summary.get("decision") or (report or {}).get("decision")
        or ("accepted" if exit_code == 0 else "failed"),
        "final": final, "rejected": rejected,
        "chosen_step": summary.get("chosen_step", (report or {}).get("chosen_step")), "steps": summary.get("steps"),
        "metrics": {"eval_loss_start": summary.get("eval_loss_start"),
                    "eval_loss": summary["eval_loss"] if summary.get("eval_loss") is not None else _new_task(report),
                    "suites": suite_metrics(report)},
        "error": first_line, "started": attempts[0]["started"], "finished": finished,
        "seconds": round(time.time() - began, 1), "attempts": attempts,
    }


def write(output_dir: str | Path, verdict: dict) -> Path:
    """Write ``verdict`` to output_dir/verdict.json atomically (temp file, then rename). Returns the path."""
    from distrib_ft.runtime.checkpoint import atomic_write_text
    from distrib_ft.runtime.storage import as_path

    path = as_path(output_dir) / VERDICT
    atomic_write_text(path, json.dumps(verdict, indent=2) + "\n")
    return path


def read(output_dir: str | Path) -> dict | None:
    """output_dir/verdict.json, or None when there is none.

    Raises:
        ValueError: the file is not a verdict (not JSON, or no ``exit_code``); one line naming it.
    """
    from distrib_ft.runtime.storage import as_path

    path = as_path(output_dir) / VERDICT
    if not path.is_file():
        return None
    try:
        v = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a verdict (invalid JSON: {e})") from None
    if not isinstance(v, dict) or not isinstance(v.get("exit_code"), int):
        raise ValueError(f"{path}: not a verdict (no integer exit_code)")
    return v


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def line(v: dict) -> str:
    """One line: ``exit 0 (accepted at step 4): /out/final; eval_loss 2.3100 -> 1.2000; finished ...``."""
    step = f" at step {v['chosen_step']}" if v.get("chosen_step") is not None else ""
    where = v.get("final") or v.get("rejected") or v.get("error") or "no model"
    m = v.get("metrics") or {}
    loss = (f"; eval_loss {_num(m.get('eval_loss_start'))} -> {_num(m.get('eval_loss'))}"
            if m.get("eval_loss_start") is not None else "")
    return f"exit {v['exit_code']} ({v.get('decision')}{step}): {where}{loss}; finished {v.get('finished')}"


def text(v: dict, path: str | Path | None = None) -> str:
    """The verdict for a person: the job, the outcome, the model's folder, the metrics, the attempts."""
    lines = [f"{'Verdict ' + str(path) if path else 'Verdict'}: {line(v)}",
             f"  job: {v.get('job')} ({v.get('command')}, sha256 {str(v.get('job_sha256'))[:12]})"]
    if v.get("final"):
        lines.append(f"  final: {v['final']}")
    if v.get("rejected"):
        lines.append(f"  rejected (out of the forgetting budget): {v['rejected']}")
    if v.get("error"):
        lines.append(f"  error: {v['error']}")
    m = v.get("metrics") or {}
    if m.get("eval_loss_start") is not None:
        lines.append(f"  new task eval_loss: {_num(m['eval_loss_start'])} at step 0 -> {_num(m.get('eval_loss'))}")
    for name, s in (m.get("suites") or {}).items():
        ok = {True: "within budget", False: "BREACHED", None: "-"}[s.get("within_budget")]
        lines.append(f"  {name} ({s.get('metric')}): baseline {_num(s.get('baseline'))} -> {_num(s.get('value'))} "
                     f"at step {s.get('step')}, {ok}")
    attempts = v.get("attempts") or []
    lines.append(f"  attempts: {len(attempts)}; started {v.get('started')}, finished {v.get('finished')} "
                 f"({v.get('seconds')} s the last)")
    for i, a in enumerate(attempts, 1):
        extra = (f", resumed from {a['resumed_from']}" if a.get("resumed_from") else "") + \
            (f", error: {a['error']}" if a.get("error") else "")
        lines.append(f"    {i}. {a.get('started')} -> {a.get('finished')}: exit {a.get('exit_code')}{extra}")
        restarts = a.get("worker_attempts") or []
        for w in restarts if len(restarts) > 1 else []:  # Ray restarted the workers within this submission
            lines.append(f"       worker attempt {w.get('attempt')}"
                         + (f": resumed from {w['resumed_from']}" if w.get("resumed_from") else "")
                         + (f"; ended: {w['error']}" if w.get("error") else ""))
    return "\n".join(lines)
