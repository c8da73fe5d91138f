"""Surviving a worker's death: Ray Train restarts the worker group and the loop resumes from the newest checkpoint.

``distributed.max_failures: N`` is Ray Train's ``FailureConfig(max_failures=N)``: when a worker process dies (or
raises), the Train controller shuts the whole worker group down, starts a new one and runs the train function
again, up to N times (Ray Train v2, "Handling failures and node preemption",
https://docs.ray.io/en/latest/train/user-guides/fault-tolerance.html). Ray does not tell the train function
that it is a restart, nor why the last attempt ended; this module does:

- :class:`AttemptLedger`, a Ray Train controller + worker-group callback (Ray's own ``BackendSetupCallback`` is
  one, ray/train/v2/_internal/execution/callback.py), lives in the controller for the whole run. It records each
  failure's one-line reason (:func:`describe`) when the controller restarts, and before every new group runs the
  train function it hands the attempt (number, of how many, the earlier failures) to each worker in
  ``DISTRIB_FT_ATTEMPT``. It also writes that ledger to a file on the driver's node (the controller runs there),
  which the driver reads after the run, also after a run that failed for good.
- :func:`current` reads it in the worker: attempt 2 and later resume (``--resume``'s path: engine, optimizer,
  scheduler, RNG, data position, the defences' and the monitor's state) from the newest complete checkpoint;
  before any checkpoint they start again from step 0.
- :func:`failure_policy`: Ray's default failure policy, but a worker group's failure is retried only when it is one
  of the workers' machinery -- a death, a hang, a lost connection (:func:`recoverable`); an input error, a bug or a
  broken file would recur on every attempt and ends the run at once.
- :func:`explain`: a collective that timed out (``distributed.collective_timeout_s``, torch.distributed's process
  group timeout through Ray's ``TorchConfig(timeout_s=...)``) becomes :class:`CollectiveTimeout` with a line that
  says what happened instead of gloo's "Timed out waiting 20000ms for recv operation to complete".

The attempts are recorded in summary.json (``attempts``: per attempt the step it resumed from and why it ended)
and carried in every checkpoint's client state, so that a later attempt still knows the earlier ones.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ENV = "DISTRIB_FT_ATTEMPT"
_TIMEOUT = re.compile(r"Timed out waiting|Application timeout caused pair closure|[Ww]atchdog caught collective "
                      r"operation timeout|collective operation timeout|DistStoreError.*[Tt]imeout")
_PEER_GONE = re.compile(r"Connection reset by peer|Connection closed by peer|Broken pipe|"
                        r"[Cc]onnection refused|NCCL communicator was aborted")


class CollectiveTimeout(RuntimeError):
    """A collective (all-reduce, barrier) waited longer than ``distributed.collective_timeout_s``."""


class WorkerLost(RuntimeError):
    """A worker process died (killed, out of memory, its node lost); the message says which and how."""


@dataclass
class Attempt:
    """This worker group's attempt: its number (from 1), how many the job may make, and the earlier failures."""

    number: int = 1
    of: int = 1
    failures: list[str] = field(default_factory=list)
    run: str | None = None  # this submission's id (the driver's): a --resume of another submission is not a restart

    @property
    def restarted(self) -> bool:
        return self.number > 1


def current() -> Attempt:
    """The attempt this process runs, from ``DISTRIB_FT_ATTEMPT`` (attempt 1 of 1 outside Ray)."""
    raw = os.environ.get(ENV)
    if not raw:
        return Attempt()
    d = json.loads(raw)
    return Attempt(number=int(d["attempt"]), of=int(d["of"]), failures=list(d.get("failures", [])), run=d.get("run"))


def resume_line(attempt: Attempt, latest) -> str:
    """``attempt 2 of 3: a worker died (...); resuming from checkpoints/step-4``: rank 0 prints it on a restart."""
    why = attempt.failures[-1] if attempt.failures else "the previous attempt failed"
    where = (f"resuming from checkpoints/{latest.name}" if latest is not None
             else "no complete checkpoint yet: starting again from step 0")
    return f"attempt {attempt.number} of {attempt.of}: {why}; {where}"


def history(saved: list | None, attempt: Attempt, latest, step: int) -> list[dict]:
    """Every attempt of this run so far, the current one last: ``{"run", "attempt", "resumed_from", "step", "error"}``.

    ``saved`` is the list the resumed checkpoint carries: the attempts of this run (this submission: ``run``) up to
    the one that wrote it. The attempts after that one wrote no newer complete checkpoint, so each of them resumed
    from the same checkpoint as this attempt. ``error`` is why the attempt ended, as the controller recorded it
    (None: running, or finished).
    """
    where = f"checkpoints/{latest.name}" if latest is not None else None
    mine = {a["attempt"]: dict(a) for a in saved or []
            if a.get("run") == attempt.run and a.get("attempt", 0) < attempt.number}
    for n in range(1, attempt.number + 1):
        mine.setdefault(n, {"run": attempt.run, "attempt": n, "resumed_from": where, "step": step, "error": None})
    for n, a in mine.items():
        if n < attempt.number:
            a["error"] = attempt.failures[n - 1] if n - 1 < len(attempt.failures) else a.get("error")
    return [mine[n] for n in sorted(mine)]


def explain(error: BaseException, timeout_s: int | None) -> BaseException | None:
    """A clearer exception for ``error`` raised on a worker, or None to raise it as it is.

    A torch.distributed timeout (gloo's "Timed out waiting ...ms", NCCL's watchdog) -> :class:`CollectiveTimeout`.
    """
    text = f"{type(error).__name__}: {error}"
    if _TIMEOUT.search(text):
        limit = f"{timeout_s} s" if timeout_s else "distributed.collective_timeout_s"
        return CollectiveTimeout(f"a collective waited more than {limit}: a worker hangs or died "
                                 "(distributed.collective_timeout_s)")
    return None


def set_collective_timeout(seconds: int) -> None:
    """Give process groups created from now on (DeepSpeed's data-parallel groups) the world group's timeout.

    Ray's ``TorchConfig(timeout_s=...)`` sets it on the world group only; ``torch.distributed.new_group`` without a
    timeout takes torch's default (30 min), so a survivor waiting in DeepSpeed's gradient all-reduce for a hung
    worker would not time out (seen: the survivor of a SIGSTOPped worker waited past collective_timeout_s there).
    """
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=seconds)
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _chain(e: BaseException) -> list[BaseException]:
    """A worker's failure and the causes Ray kept of it (``health_check_failure`` / ``cause`` / ``__cause__``)."""
    out, seen = [], set()
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = getattr(e, "health_check_failure", None) or getattr(e, "cause", None) or e.__cause__
    return out


def _root(e: BaseException) -> BaseException:
    """The innermost cause Ray kept of a worker's failure."""
    return _chain(e)[-1]


def _timeout_of(e: BaseException) -> CollectiveTimeout | None:
    return next((x for x in _chain(e) if isinstance(x, CollectiveTimeout)), None)


def _is_death(e: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(e, RayActorError) or isinstance(_root(e), RayActorError) \
        or type(e).__name__ == "WorkerHealthCheckTimeoutError"


def _death_text(rank: int, e: BaseException) -> str:
    """``a worker died (rank 1, pid 1234 on 10.0.0.2; ...)`` from Ray's actor-death error (its pid and ip fields)."""
    text = f"{e}\n{_root(e)}"
    pid = re.search(r"\bpid[=:]\s*(\d+)", text)
    ip = re.search(r"\b(?:node_)?ip[=:]\s*'?([0-9a-fA-F.:]+[0-9a-fA-F])", text)
    who = f"rank {rank}" + (f", pid {pid.group(1)}" if pid else "") + (f" on {ip.group(1)}" if ip else "")
    if type(e).__name__ == "WorkerHealthCheckTimeoutError":
        return f"a worker stopped answering Ray's health checks ({who})"
    return f"a worker died ({who}; killed, out of memory, or its node lost)"


def failures_of(error: BaseException) -> dict[int, BaseException]:
    """The per-rank failures of a Ray Train error (a WorkerGroupError's ``worker_failures``), else ``{-1: error}``."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        return dict(failures)
    controller = getattr(error, "controller_failure", None)
    return {-1: controller if isinstance(controller, BaseException) else error}


def describe(error: BaseException) -> str:
    """One line for why an attempt ended: a worker's death first, then a collective timeout, then rank 0's error.

    When one rank dies the others fail too (a reset connection, a collective timeout): the death is the cause.
    """
    failures = failures_of(error)
    for rank, e in sorted(failures.items()):
        if _is_death(e):
            return _death_text(rank, e)
    for _rank, e in sorted(failures.items()):
        if _timeout_of(e) is not None:
            return _first_line(str(_timeout_of(e)))
    for rank, e in sorted(failures.items()):
        root = _root(e)
        if _TIMEOUT.search(str(root)):
            return f"a collective timed out on rank {rank}: a worker hangs or died ({_first_line(str(root))[:160]})"
    rank, e = min(failures.items())
    root = _root(e)
    if _PEER_GONE.search(str(root)):
        return f"a worker lost its connection to the others (rank {rank}: {_first_line(str(root))[:160]})"
    where = f"rank {rank}: " if rank >= 0 else ""
    return f"{where}{type(root).__name__}: {_first_line(str(root))[:200]}"


def main_error(error: BaseException) -> BaseException | None:
    """What the driver reports of a run that failed for good.

    :class:`WorkerLost` when a worker died, the :class:`CollectiveTimeout` when one hung, else None (the workers'
    first error then).
    """
    failures = sorted(failures_of(error).items())
    for rank, e in failures:
        if _is_death(e):
            return WorkerLost(_death_text(rank, e))
    return next((_timeout_of(e) for _, e in failures if _timeout_of(e) is not None), None)


def _input_error(e: BaseException) -> bool:
    """The CLI's input errors (exit 2) or a job check's ValueError: another attempt would meet them again."""
    from distrib_ft.data.formats import DataError
    from distrib_ft.runtime.engine import DeepSpeedConfigError
    from distrib_ft.schema import ConfigError

    return any(isinstance(x, (ConfigError, DataError, DeepSpeedConfigError, FileNotFoundError, ValueError))
               for x in _chain(e))


def infrastructure(e: BaseException) -> bool:
    """A failure of the workers' machinery, not of the job: a death, a hang, a lost connection, a network timeout."""
    if _is_death(e) or _timeout_of(e) is not None or type(e).__name__.startswith("WorkerHealthCheck"):
        return True
    for x in _chain(e):
        if isinstance(x, (ConnectionError, TimeoutError)) or type(x).__name__ in ("DistNetworkError", "DistStoreError"):
            return True
        if _TIMEOUT.search(str(x)) or _PEER_GONE.search(str(x)):
            return True
    return False


def recoverable(error: BaseException) -> bool:
    """Whether another attempt may succeed.

    Yes when a worker died, hung (a collective timed out, Ray's health check failed) or lost its connection to the
    others -- and no worker failed on an input error. Any other error (a bug, a broken weights file) would recur on
    every attempt: the run ends with it at once.
    """
    failures = failures_of(error).values()
    return not any(_input_error(e) for e in failures) and any(infrastructure(e) for e in failures)


def failure_policy(failure_config):
    """Ray Train's default failure policy, retrying a worker group's failure only when it is :func:`recoverable`.

    The controller's own failures (a worker group that could not start) keep Ray's handling.
    """
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    class RecoveryPolicy(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, WorkerGroupError) and not recoverable(training_failed_error):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return RecoveryPolicy(failure_config)


def _set_attempt(value: str) -> None:
    os.environ[ENV] = value


def ledger_callback(max_failures: int, path: str | Path):
    """An :class:`AttemptLedger` for a run of at most ``max_failures + 1`` attempts, writing its ledger to ``path``."""
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class AttemptLedger(ControllerCallback, WorkerGroupCallback):
        """Counts the worker groups the controller starts and records why each ended (see the module docstring)."""

        def __init__(self):
            self.of, self.path, self.run = max_failures + 1, str(path), uuid.uuid4().hex[:12]
            self.started, self.failures = 0, []

        def after_controller_state_update(self, previous_state, current_state) -> None:
            error = getattr(current_state, "training_failed_error", None)
            if error is not None and len(self.failures) < self.started:
                self.failures.append(describe(error))
                self._write()

        def after_worker_group_start(self, worker_group) -> None:
            self.started += 1
            worker_group.execute(_set_attempt, json.dumps({"attempt": self.started, "of": self.of,
                                                           "failures": self.failures, "run": self.run}))
            self._write()

        def _write(self) -> None:
            try:  # the driver's node; a Ray Client driver (ray://) is elsewhere and reads nothing
                write_ledger(self.path, {"attempts": self.started, "of": self.of, "failures": self.failures})
            except OSError:
                pass

    return AttemptLedger()


def write_ledger(path: str | Path, ledger: dict) -> None:
    """Write the ledger atomically (temp file, then rename): the driver may read it at any time."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(ledger, f)
    os.replace(tmp, path)


def read_ledger(path: str | Path) -> list[dict]:
    """The driver's view of the attempts after a run: ``[{"attempt", "error"}]`` (empty when none started)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    failures = d.get("failures", [])
    return [{"attempt": n, "error": failures[n - 1] if n - 1 < len(failures) else None}
            for n in range(1, int(d.get("attempts", 0)) + 1)]
