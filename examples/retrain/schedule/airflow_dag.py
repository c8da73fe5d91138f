"""An Airflow DAG that runs ``distrib-ft retrain`` on a schedule and acts on its outcome (docs/scheduling.md).

    retrain (exit code) -> branch -> deploy   (0: every round promoted; roll out the registry's current version)
                                  -> alert    (3: a round was refused; production unchanged; say why)
                                  -> fail     (1, 2, 130, anything else: the DAG run fails)

The decision is plain Python and needs no Airflow: :func:`decide` (pure: the exit code, ``REGISTRY/
pipeline_report.json`` and the refused round's ``verdict.json``) and :func:`load_outcome` (reads those files from
a folder or a URL). Airflow is imported only inside the guard at the bottom, so this file is importable, and
tested, without it (tests/unit/test_schedule_examples.py). Copy it into Airflow's ``dags/`` folder and set the
environment below (or edit the constants); written for the TaskFlow API
(https://airflow.apache.org/docs/apache-airflow/stable/tutorial/taskflow.html), Airflow 3 (``airflow.sdk``) or 2
(``airflow.decorators``). Run with ``airflow dags test`` under Airflow 3.3.2 (in a separate venv: Airflow is not a
dependency of distrib-ft) on a real registry, once per branch; not run under Airflow 2.

What the pipeline leaves for a scheduler (docs/scheduling.md): its exit code; ``REGISTRY/pipeline_report.json``
with ``exit_code``, ``current`` and ``rounds: [{name, version, decision, verdict}, ...]`` (``verdict``: the round
job's verdict line; also the forgetting matrix R, ACC, BWT, FWT); ``REGISTRY/rounds/<round>.json``, the round's
record, with ``reason`` (the gate's, for a refused round) and ``output_dir``; and in that folder the round job's
``verdict.json`` (distrib_ft/runtime/verdict.py: ``decision``, ``metrics.suites`` with each retention suite's
baseline, value and ``within_budget``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

# Where things are (environment of the Airflow worker; edit here or set them there).
# The defaults run the demo pipeline (examples/retrain/pipeline.yaml) in a checkout on the Airflow worker. On a Ray
# cluster (RAY_JOBS_ADDRESS set), PIPELINE is read on the head, and REGISTRY must be where both the head and this
# worker see it: a URL (s3://...) in the pipeline file's `registry:`, the same here.
DISTRIB_FT_HOME = os.environ.get("DISTRIB_FT_HOME", "/opt/distrib-ft")  # a checkout: the run's cwd, submit_retrain.py
PIPELINE = os.environ.get("RETRAIN_PIPELINE", "examples/retrain/pipeline.yaml")  # relative: to DISTRIB_FT_HOME
REGISTRY = os.environ.get("RETRAIN_REGISTRY", "outputs/retrain_demo/defended/registry")  # the file's `registry:`
RAY_JOBS_ADDRESS = os.environ.get("RAY_JOBS_ADDRESS", "")  # http://HEAD:8265; empty: run `distrib-ft retrain` here
SCHEDULE = os.environ.get("RETRAIN_SCHEDULE", "17 3 * * *")  # cron syntax, the DAG's timezone (UTC by default)

REPORT = "pipeline_report.json"
VERDICT = "verdict.json"


@dataclass(frozen=True)
class Decision:
    """What to do after a run: ``action`` is ``deploy``, ``alert`` or ``fail``; ``message`` is one line.

    ``version``: deploy: the version now current (roll it out); alert: the refused version. ``round``: the refused
    round's name (alert).
    """

    action: str
    message: str
    version: str | None = None
    round: str | None = None


def refused_round(report: dict | None) -> dict | None:
    """The round ``pipeline_report.json`` says was refused (the pipeline stops there, so at most one), else None."""
    rounds = (report or {}).get("rounds") or []
    return next((r for r in rounds if isinstance(r, dict) and r.get("decision") == "refused"), None)


def _suites_out_of_budget(verdict: dict | None) -> list[str]:
    suites = ((verdict or {}).get("metrics") or {}).get("suites") or {}
    out = []
    for name, s in suites.items():
        if s.get("within_budget") is False:
            out.append(f"{name} {s.get('metric') or 'nll'} {s.get('baseline')} -> {s.get('value')}")
    return out


def decide(exit_code: int, report: dict | None, record: dict | None = None, verdict: dict | None = None) -> Decision:
    """The branch to take after ``distrib-ft retrain`` ended with ``exit_code``. Pure: no I/O.

    Args:
        exit_code: the pipeline's own exit code (through the Ray Jobs API: cluster/submit_retrain.py's).
        report: ``REGISTRY/pipeline_report.json`` as a dict, None when it is missing.
        record: the refused round's ``REGISTRY/rounds/<round>.json`` (exit 3): its ``reason`` is the gate's.
        verdict: the refused round's ``verdict.json`` (exit 3): the job's decision and its suites' numbers.

    Returns:
        0 with a report of this run naming ``current``: deploy that version. 3: alert with the refused round's
        reason (the gate's, else the suites its verdict.json has out of budget), where its verdict.json is, and the
        version that stays in production. Any other code: fail, naming it; 0 or 3 with a report of another run
        (its ``exit_code`` differs: this run did not write one): fail too.
    """
    meaning = {1: "a round's job failed (see its log; a re-run resumes the round from its checkpoint)",
               2: "bad input: the pipeline file, a job key or a data file (nothing trained; fix it)",
               130: "interrupted (a re-run resumes)"}
    if exit_code not in (0, 3):
        return Decision("fail", f"distrib-ft retrain exited {exit_code}: {meaning.get(exit_code, 'unexpected code')}")
    if report is not None and report.get("exit_code") is not None and report["exit_code"] != exit_code:
        return Decision("fail", f"distrib-ft retrain exited {exit_code} but {REPORT} says exit_code "
                        f"{report['exit_code']}: the report is from an earlier run (this one did not write it)")
    current = (report or {}).get("current")
    if exit_code == 0:
        if not current:
            return Decision("fail", f"distrib-ft retrain exited 0 but {REPORT} names no current version"
                            + ("" if report is not None else f" ({REPORT} missing)"))
        done = [r.get("name") for r in (report.get("rounds") or []) if isinstance(r, dict)
                and r.get("decision") == "promoted"]
        return Decision("deploy", f"every round promoted ({', '.join(filter(None, done)) or 'none'}); "
                        f"deploy {current}", version=current)
    r = refused_round(report)  # exit 3
    if r is None:
        return Decision("alert", f"a round was refused (exit 3) but {REPORT} "
                        + ("is missing" if report is None else "lists no refused round")
                        + f"; production stays at {current or 'the previous version'}")
    parts = [f"round {r.get('name')} refused {r.get('version') or '(no version)'}: "
             + ((record or {}).get("reason") or "; ".join(_suites_out_of_budget(verdict)) or "reason not recorded")]
    if r.get("verdict"):
        parts.append(f"job: {r['verdict']}")
    if (record or {}).get("output_dir"):
        parts.append(f"verdict {str(record['output_dir']).rstrip('/')}/{VERDICT}")
    parts.append(f"production stays at {current or 'no version (nothing promoted yet)'}")
    return Decision("alert", "; ".join(parts), version=r.get("version"), round=r.get("name"))


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def registry_path(registry: str = REGISTRY, home: str = DISTRIB_FT_HOME) -> str:
    """The registry as this worker reads it.

    A URL as it is; a relative folder (as the pipeline file names it: relative to the run's working directory)
    under ``home``.
    """
    return registry if "://" in registry or os.path.isabs(registry) else os.path.join(home, registry)


def read_json(path: str) -> dict | None:
    """A JSON file from a folder or a URL; None when it does not exist.

    URLs (s3://, gs://, hdfs://) are read through pyarrow.fs, as distrib-ft writes them.
    """
    if "://" not in path:
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type == fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(inner) as f:
        return json.loads(f.read().decode())


def load_outcome(registry: str, exit_code: int) -> tuple[dict | None, dict | None, dict | None]:
    """``(pipeline_report.json, the refused round's record, its verdict.json)`` of ``registry``; None when missing.

    The record (``REGISTRY/rounds/<round>.json``) and the verdict (in the record's ``output_dir``) are read only for
    exit 3, for the round the report lists as refused. ``decide(code, *load_outcome(registry, code))``.
    """
    report = read_json(_join(registry, REPORT))
    record = verdict = None
    r = refused_round(report) if exit_code == 3 else None
    if r is not None:
        record = read_json(_join(registry, "rounds", f"{r.get('name')}.json"))
        if (record or {}).get("output_dir"):
            verdict = read_json(_join(str(record["output_dir"]), VERDICT))
    return report, record, verdict


def retrain_command(submission_id: str | None = None) -> list[str]:
    """The command the ``retrain`` task runs.

    Through the Ray Jobs API when RAY_JOBS_ADDRESS is set (cluster/submit_retrain.py: the pipeline's own code comes
    back), else ``distrib-ft retrain`` on this worker (an embedded Ray).
    """
    if RAY_JOBS_ADDRESS:
        cmd = [sys.executable, os.path.join(DISTRIB_FT_HOME, "cluster", "submit_retrain.py"),
               "--address", RAY_JOBS_ADDRESS]
        if submission_id:
            cmd += ["--submission-id", submission_id]
        return [*cmd, PIPELINE]
    return ["distrib-ft", "retrain", PIPELINE]


def submission_id(run_id: str) -> str:
    """A Ray submission id from an Airflow run id (``scheduled__2026-11-30T03:17:00+00:00``).

    The same in each try of the task, so a retried task follows its pipeline instead of starting a second one.
    """
    return "retrain-" + re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)


try:  # Airflow 3, then 2; absent: the functions above stay importable
    try:
        from airflow.sdk import dag, get_current_context, task
    except ImportError:
        from airflow.decorators import dag, task
        from airflow.operators.python import get_current_context
    import pendulum
except ImportError:
    dag = None

if dag is not None:

    @dag(dag_id="distrib_ft_retrain", schedule=SCHEDULE, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         catchup=False, max_active_runs=1, tags=["distrib-ft"])
    def distrib_ft_retrain():
        """Retrain, then deploy (exit 0), alert (3) or fail (anything else)."""
        @task(retries=2)
        def retrain() -> int:
            """Run the pipeline; return its exit code (0, 2, 3, 130 are data here, not a task failure).

            Exit 1 (a round's job failed, or the submission did) raises, so Airflow retries the task: the pipeline
            skips its finished rounds and resumes the unfinished one; after the last try the DAG run fails.
            """
            run_id = get_current_context()["run_id"]
            proc = subprocess.run(retrain_command(submission_id(run_id)), cwd=DISTRIB_FT_HOME)
            if proc.returncode == 1:
                raise RuntimeError("distrib-ft retrain exited 1 (a job failed, or the submission did)")
            return proc.returncode

        @task.branch
        def branch(exit_code: int) -> str:
            d = decide(exit_code, *load_outcome(registry_path(), exit_code))
            print(f"decision: {d.action}: {d.message}")
            return d.action

        @task
        def deploy(exit_code: int) -> str:
            d = decide(exit_code, *load_outcome(registry_path(), exit_code))
            model = _join(registry_path(), "versions", d.version, "model")
            print(f"deploy {d.version}: {model}")  # replace with your rollout (e.g. `distrib-ft export` then serve)
            return model

        @task
        def alert(exit_code: int) -> str:
            d = decide(exit_code, *load_outcome(registry_path(), exit_code))
            print(f"ALERT: {d.message}")  # replace with your notifier (Slack, e-mail, a pager)
            return d.message

        @task(retries=0)
        def fail(exit_code: int) -> None:
            raise RuntimeError(decide(exit_code, *load_outcome(registry_path(), exit_code)).message)

        code = retrain()
        branch(code) >> [deploy(code), alert(code), fail(code)]

    distrib_ft_retrain()
