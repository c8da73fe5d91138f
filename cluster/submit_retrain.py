"""Submit ``distrib-ft retrain PIPELINE.yaml`` to a Ray cluster through the Jobs API; exit with the pipeline's code.

    python cluster/submit_retrain.py --address http://HEAD:8265 [--submission-id ID] [--working-dir DIR]
        [--distrib-ft CMD] [--no-logs] PIPELINE.yaml [retrain options, e.g. --round r2]

It does what ``ray job submit --address ADDR [--submission-id ID] [--working-dir DIR] -- distrib-ft retrain
PIPELINE.yaml --address auto`` does, with the same Jobs SDK (``ray.job_submission.JobSubmissionClient``,
https://docs.ray.io/en/latest/cluster/running-applications/job-submission/sdk.html): it submits the entrypoint,
streams its log to stdout and waits for the end. Two things ``ray job submit`` does not do:

- **The exit code.** ``ray job submit`` exits 1 for every failed job and 0 for a stopped one; the pipeline's own code
  (0 every round promoted, 3 a round refused, 1 a job failed, 2 bad input, 130 interrupted) is lost. Ray keeps it
  as the job's ``driver_exit_code``; this script prints ``distrib-ft exit code: N`` as its last line (as
  cluster/submit_train.py does for ``ray submit``) and exits with N. A job ``ray job stop`` ended is 130. No such
  line: the submission itself failed (the Jobs API unreachable, a bad argument): exit 1 (2 for a bad argument).
- **Never two pipelines at once.** A Ray job outlives the client that submitted it: a CronJob pod that dies (node
  drain, ``activeDeadlineSeconds``) leaves its pipeline running on the cluster, where Kubernetes'
  ``concurrencyPolicy: Forbid`` no longer sees it. While a Ray job with the same entrypoint (the same pipeline
  command) is PENDING or RUNNING, this script follows that job instead of submitting a second one on the same
  registry and output folders. With ``--submission-id ID`` (a CronJob passes its Job's name, the same in each pod
  it retries) an ended attempt is not re-run blindly: with 0, 2 or 3 its code is reported again (a re-run would
  decide the same); with 1 or 130 (or no code: Ray lost the driver) attempt ``ID.2`` (then ``ID.3``, ...) is
  submitted, and the pipeline skips its finished rounds and resumes the unfinished one from its checkpoint.
  Without ``--submission-id`` a new job is submitted whenever none of the same command is running.

Arguments after PIPELINE.yaml go to ``distrib-ft retrain`` as they are. ``--distrib-ft`` is how the head runs the
CLI (default ``distrib-ft``, on the head's PATH; e.g. ``~/distrib-ft/.venv/bin/distrib-ft`` or ``python -m
launcher.cli``). Needs only Ray (the ``ray[default]`` client of the cluster's version), not distrib-ft itself, so it
runs in a bare ``rayproject/ray`` container. See docs/scheduling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import sys
import time

EXIT_LINE = "distrib-ft exit code: {}"  # the same line as cluster/submit_train.py; docs/scheduling.md parses it
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
FINAL_CODES = (0, 2, 3)  # an ended attempt with one of these is reported again, not submitted again
POLL_S = 2.0


def entrypoint(pipeline: str, extra: list[str], distrib_ft: str = "distrib-ft") -> str:
    """The shell command the Ray job runs on the head: ``distrib-ft retrain PIPELINE --address auto EXTRA``.

    Args:
        pipeline: the pipeline file, as the head sees it (relative: to ``--working-dir``'s copy, else the head's cwd).
        extra: more ``distrib-ft retrain`` arguments (``--round r2``).
        distrib_ft: how the head runs the CLI (one or more words).
    """
    return " ".join([*(shlex.quote(w) for w in shlex.split(distrib_ft)), "retrain", shlex.quote(pipeline),
                     "--address", "auto", *(shlex.quote(a) for a in extra)])


def job_code(status: str, driver_exit_code: int | None) -> int:
    """The pipeline's exit code from a terminal Ray job's status and ``driver_exit_code``.

    SUCCEEDED: 0. STOPPED (``ray job stop``, the entrypoint sent SIGTERM): 130, interrupted. FAILED: the entrypoint's
    own code; a negative one (killed by signal N) is 128 + N as a shell reports it; none (the entrypoint never
    started, or Ray lost its supervisor) is 1.
    """
    status = str(getattr(status, "value", status))
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_INTERRUPTED
    if driver_exit_code is None:
        return EXIT_FAILED
    return 128 - driver_exit_code if driver_exit_code < 0 else driver_exit_code


def attempt_ids(submission_ids: list[str], base: str) -> list[str]:
    """The attempts of ``base`` among ``submission_ids``, in order: ``base``, ``base.2``, ``base.3``, ..."""
    pat = re.compile(re.escape(base) + r"(?:\.(\d+))?$")
    found = [(int(m.group(1) or 1), s) for s in submission_ids if s and (m := pat.match(s))]
    return [s for _, s in sorted(found)]


def next_attempt(base: str, attempts: list[str]) -> str:
    """The submission id of the attempt after ``attempts`` (``base`` when there is none)."""
    return base if not attempts else f"{base}.{len(attempts) + 1}"


def _tail(client, job_id: str) -> None:
    async def go():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(go())


def _wait(client, job_id: str):
    """The job's info once it has ended (the log stream can close a moment before the status changes)."""
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        time.sleep(POLL_S)


def _say(text: str) -> None:
    print(f"submit_retrain: {text}", flush=True)


def run(client, command: str, *, submission_id: str | None = None, runtime_env: dict | None = None,
        logs: bool = True) -> int:
    """Submit ``command`` (or attach to a running job of the same command), follow it, return its exit code.

    A non-terminal Ray job whose entrypoint is ``command`` (any submission id) is followed, never doubled. Else with
    ``submission_id``: its last attempt's code when that was 0, 2 or 3, else a new attempt ``ID.<n>``.

    Args:
        client: a ``ray.job_submission.JobSubmissionClient``.
        command: the entrypoint (:func:`entrypoint`).
        submission_id: the scheduler run's id; attempts are ``ID``, ``ID.2``, ...; None: a new id from Ray.
        runtime_env: e.g. ``{"working_dir": "."}``.
        logs: stream the job's log to stdout.

    Returns:
        The pipeline's exit code (:func:`job_code`).

    Raises:
        ValueError: ``submission_id``'s jobs run another entrypoint (the id is not this pipeline's).
    """
    jobs = client.list_jobs()
    running = [j for j in jobs if j.entrypoint == command and not j.status.is_terminal()]
    if running:  # a pod that died left its pipeline running, or another run of the schedule is still going
        newest = max(running, key=lambda j: j.start_time or 0)
        job_id = newest.submission_id
        _say(f"attaching to {job_id} ({newest.status.value}): this pipeline is already running there; "
             "not submitting a second one")
    else:
        job_id = None
    if job_id is None and submission_id is not None:
        by_id = {j.submission_id: j for j in jobs if j.submission_id}
        attempts = attempt_ids(list(by_id), submission_id)
        if attempts:
            last = by_id[attempts[-1]]
            if last.entrypoint != command:
                raise ValueError(f"--submission-id {submission_id}: Ray job {attempts[-1]} ran {last.entrypoint!r},"
                                 f" not {command!r}; use another id")
            code = job_code(last.status, last.driver_exit_code)
            if code in FINAL_CODES:
                _say(f"{attempts[-1]} already ended with exit {code} ({last.status.value}); not submitted again "
                     f"(its log: ray job logs {attempts[-1]})")
                return code
            _say(f"{attempts[-1]} ended with exit {code}; submitting attempt {len(attempts) + 1} "
                 "(the pipeline skips finished rounds and resumes the unfinished one)")
        submission_id = next_attempt(submission_id, attempts)
    if job_id is None:
        job_id = client.submit_job(entrypoint=command, submission_id=submission_id, runtime_env=runtime_env or None)
        _say(f"submitted {job_id}: {command}")
    if logs:
        try:
            _tail(client, job_id)
        except Exception as e:  # the log stream broke (a proxy's timeout, a dashboard restart): the job goes on
            _say(f"the log stream of {job_id} ended ({type(e).__name__}: {str(e)[:200]}); waiting for the job's end "
                 f"(its log: ray job logs {job_id})")
    info = _wait(client, job_id)
    code = job_code(info.status, info.driver_exit_code)
    if info.status.value != "SUCCEEDED" and info.driver_exit_code is None:
        first = (info.message or "").strip().splitlines()[:1]
        _say(f"{job_id} {info.status.value} without an exit code{': ' + first[0] if first else ''}")
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="submit_retrain.py", description="Submit `distrib-ft retrain PIPELINE.yaml` "
                                "to a Ray cluster's Jobs API and exit with the pipeline's own exit code.")
    p.add_argument("--address", default=None, help="the Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                   "then RAY_ADDRESS)")
    p.add_argument("--submission-id", default=None, help="this scheduler run's id (a CronJob's Job name): a retried "
                   "run attaches to its running pipeline or submits ID.2, ID.3, ... after a failure")
    p.add_argument("--working-dir", default=None, help="a folder uploaded for the job (relative paths in the "
                   "pipeline file are read there)")
    p.add_argument("--distrib-ft", default="distrib-ft", help="how the head runs the CLI (default: distrib-ft)")
    p.add_argument("--no-logs", action="store_true", help="do not stream the job's log")
    p.add_argument("pipeline", metavar="PIPELINE.yaml", help="the pipeline file, as the head sees it")
    p.add_argument("retrain_args", nargs=argparse.REMAINDER, help="more `distrib-ft retrain` arguments (--round r2)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, submit or attach, print ``distrib-ft exit code: N`` last; returns N (1/2: no line)."""
    args = _parser().parse_args(argv)
    command = entrypoint(args.pipeline, args.retrain_args, args.distrib_ft)
    try:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(args.address)
    except (ConnectionError, RuntimeError, ValueError) as e:  # what the SDK raises for an unreachable/bad address
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"submit_retrain: cannot reach the Ray Jobs API at {args.address or '(RAY_ADDRESS)'}: {first}; "
              "start the cluster or fix --address (http://HEAD:8265)", file=sys.stderr)
        return EXIT_FAILED
    try:
        code = run(client, command, submission_id=args.submission_id,
                   runtime_env={"working_dir": args.working_dir} if args.working_dir else None,
                   logs=not args.no_logs)
    except ValueError as e:
        print(f"submit_retrain: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:  # the Jobs API refused the request (HTTP error): one line
        print(f"submit_retrain: the Ray Jobs API refused the job: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # the head went away while we waited (ConnectionError and the like); the job may go on
        print(f"submit_retrain: lost the Ray Jobs API at {args.address or '(RAY_ADDRESS)'}: {e}; run this again with "
              "the same --submission-id to follow the job", file=sys.stderr)
        return EXIT_FAILED
    print(EXIT_LINE.format(code), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
