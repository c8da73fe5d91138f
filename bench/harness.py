"""Shared plumbing of the benchmarks in ``bench/``: worker processes, their environment, job dicts, timing.

Every bench runs its measurements in fresh worker processes: the script starts itself again with a
hidden flag (``--worker SPEC``, ``--child SPEC`` for ``profile_step.py``) and a JSON spec file; the
worker reads the spec, does one piece of work and writes its result as JSON next to the spec. This
module holds what the scripts share around that:

- the environment of a worker (:func:`worker_env`) and, inside it, the check that the parent set its
  thread count (:func:`read_spec`, :func:`pin_threads`);
- starting workers and collecting their results (:func:`start_worker`, :func:`run_worker`,
  :func:`run_parallel`, :class:`Worker`);
- the job dict that ``distrib_ft.config.config_from_dict`` validates (:func:`job_dict`, :func:`ds_config`)
  and running it in-process (:func:`train_job`, :func:`train_and_measure`);
- medians, table cells, progress lines, package versions and the recorded command line.

Nothing here imports torch or ``distrib_ft`` at module level, so a script can import it before it
fixes its own thread count.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "deepspeed", "transformers", "peft", "accelerate", "datasets")
# Left over from a distributed launch in the parent's shell, these would make a worker join another world.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED")


# ------------------------------------------------------------------------------------ environment

def limit_own_threads(threads: int = 1) -> None:
    """Set ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` of this process.

    Call it before torch is imported (torch reads them when it starts), in a driver that computes
    something itself besides starting workers.

    Args:
        threads: OpenMP / MKL threads of this process.
    """
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(threads)


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a worker process: this process's, with the bench settings on top.

    Sets the thread counts, ``DS_ACCELERATOR=cpu``, plain-log progress and no tokenizer parallelism or
    Python warnings, and removes the variables of a distributed launch (``RANK``, ``MASTER_ADDR``, ...)
    so that the worker's ``train()`` starts its own world of one.

    Args:
        threads: ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` of the worker.

    Returns:
        The environment, for ``subprocess.Popen(env=...)``.
    """
    t = str(threads)
    env = {**os.environ, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu", "DISTRIB_FT_PROGRESS": "log", "PYTHONWARNINGS": "ignore"}
    for key in _LAUNCH_VARS:
        env.pop(key, None)
    return env


def pin_threads(threads: int) -> None:
    """In a worker: check that the parent set ``OMP_NUM_THREADS`` to ``threads`` and give torch as many.

    Args:
        threads: the thread count the spec asks for.

    Raises:
        SystemExit: ``OMP_NUM_THREADS`` is not ``threads`` (the worker was not started by :func:`start_worker`).
    """
    if os.environ.get("OMP_NUM_THREADS") != str(threads):
        raise SystemExit(f"OMP_NUM_THREADS must be {threads} (set by the parent)")
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ workers

@dataclass
class Worker:
    """A started worker process (see :func:`start_worker`).

    Attributes:
        name: what it runs, for messages (the spec file's stem).
        proc: the process.
        log: its stdout and stderr, open for writing.
        spec: the spec it was given, ``result`` and ``threads`` included.
        started: ``time.time()`` at its start.
    """

    name: str
    proc: subprocess.Popen
    log: IO[str]
    spec: dict
    started: float

    @property
    def log_path(self) -> Path:
        """The file that holds the worker's stdout and stderr."""
        return Path(self.log.name)

    def running(self) -> bool:
        """Whether the process has not exited yet (does not wait)."""
        return self.proc.poll() is None

    def finish(self) -> Any:
        """Wait for the process and return the result it wrote.

        Returns:
            The JSON at ``spec["result"]``.

        Raises:
            SystemExit: the process failed; the end of its log is written to stderr first.
        """
        rc = self.proc.wait()
        self.log.close()
        if rc != 0:
            sys.stderr.write(self.log_path.read_text()[-8000:])
            raise SystemExit(f"{self.name} failed ({rc}): {self.log_path}")
        return json.loads(Path(self.spec["result"]).read_text())


def start_worker(script: str | Path, spec: dict, stem: Path, threads: int = 1, flag: str = "--worker",
                 name: str | None = None) -> Worker:
    """Start ``python SCRIPT FLAG STEM.spec.json`` in the background, with :func:`worker_env`.

    Files: the spec at ``STEM.spec.json`` (given ``result``: ``STEM.json``, and ``threads``), the
    worker's stdout and stderr at ``STEM.log``; the worker writes its result to ``spec["result"]``
    (:func:`write_result`). It runs in the repository root.

    Args:
        script: the bench script that holds the worker (usually the caller's ``__file__``).
        spec: what the worker needs; must be JSON-serializable.
        stem: path prefix of the three files (made absolute); its folder must exist.
        threads: the worker's ``OMP_NUM_THREADS`` (checked by :func:`read_spec` in the worker).
        flag: the script's hidden command-line flag for its worker.
        name: what it runs, for messages; default: the stem's file name.

    Returns:
        The started :class:`Worker`.
    """
    stem = Path(stem).resolve()  # the worker runs in the repository root
    spec = {**spec, "threads": threads, "result": f"{stem}.json"}
    spec_path = Path(f"{stem}.spec.json")
    spec_path.write_text(json.dumps(spec))
    log = open(f"{stem}.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), flag, str(spec_path)], env=worker_env(threads), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    return Worker(name or stem.name, proc, log, spec, time.time())


def run_worker(script: str | Path, spec: dict, run_dir: Path, *, threads: int, flag: str = "--worker",
               time_key: str | None = None) -> Any:
    """Run one worker in a new folder and wait for its result.

    Args:
        script: the bench script that holds the worker.
        spec: what the worker needs; it is given ``work`` (``run_dir``) besides ``result`` and ``threads``.
        run_dir: a folder that does not exist yet: the worker's files and its ``work`` folder.
        threads: the worker's ``OMP_NUM_THREADS``.
        flag: the script's hidden command-line flag for its worker.
        time_key: when given, the result (a dict) gets the worker's wall seconds, start-up included, under it.

    Returns:
        The worker's result.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True)
    worker = start_worker(script, {**spec, "work": str(run_dir)}, run_dir / "worker", threads, flag, name=run_dir.name)
    result = worker.finish()
    if time_key:
        result[time_key] = time.time() - worker.started
    return result


def run_parallel(script: str | Path, specs: Iterable[tuple[Path, dict]], threads: int = 1) -> list:
    """Start one worker per ``(stem, spec)`` at once, then wait for them all.

    Args:
        script: the bench script that holds the worker.
        specs: the file stem (see :func:`start_worker`) and spec of each worker.
        threads: ``OMP_NUM_THREADS`` of each worker.

    Returns:
        The workers' results, in the order of ``specs``.
    """
    workers = [start_worker(script, spec, stem, threads) for stem, spec in specs]
    return [w.finish() for w in workers]


def read_spec(spec_path: str | Path) -> dict:
    """In a worker: read the spec and pin the thread count it was started with (:func:`pin_threads`).

    Args:
        spec_path: the path given after the worker flag.

    Returns:
        The spec.
    """
    spec = json.loads(Path(spec_path).read_text())
    pin_threads(spec["threads"])
    return spec


def write_result(spec: dict, result: Any, indent: int | None = None) -> None:
    """In a worker: write ``result`` as JSON to ``spec["result"]``, where the parent reads it.

    Args:
        spec: the worker's spec.
        result: anything JSON-serializable.
        indent: ``json.dumps`` indentation.
    """
    Path(spec["result"]).write_text(json.dumps(result, indent=indent))


# ------------------------------------------------------------------------------------ jobs

def ds_config(zero: int) -> str:
    """Path of the repository's DeepSpeed config ``ds_configs/zero{zero}.json``.

    Args:
        zero: the ZeRO stage (0 or 2).
    """
    return str(ROOT / "ds_configs" / f"zero{zero}.json")


def job_dict(model_dir: str | Path, method: dict, data: dict, training: dict, *, zero: int,
             threads: int | None = None, dtype: str | None = None, **sections: dict) -> dict:
    """A job for ``distrib_ft.config.config_from_dict``: a world of one with DeepSpeed ZeRO-``zero``.

    Args:
        model_dir: ``model.name_or_path`` (a local folder).
        method: the ``method`` section.
        data: the ``data`` section.
        training: the ``training`` section.
        zero: the ZeRO stage; ``distributed.deepspeed`` is :func:`ds_config` of it.
        threads: when given, ``distributed.cpus_per_worker`` (and ``backend: gloo``).
        dtype: when given, ``model.dtype``.
        **sections: further sections (``ewc``, ``replay``, ``monitor``, ...), after ``distributed``.

    Returns:
        The raw job dict.
    """
    model = {"name_or_path": str(model_dir)}
    if dtype:
        model["dtype"] = dtype
    distributed: dict[str, Any] = {"num_workers": 1}
    if threads is not None:
        distributed.update(cpus_per_worker=threads, backend="gloo")
    distributed["deepspeed"] = ds_config(zero)
    return {"model": model, "method": method, "data": data, "training": training, "distributed": distributed,
            **sections}


def train_job(raw: dict) -> tuple[dict, float]:
    """Run ``distrib_ft.runtime.loop.train`` on a raw job dict in this process.

    Args:
        raw: the job (:func:`job_dict`).

    Returns:
        ``train``'s summary and the wall seconds it took (validation included).
    """
    from distrib_ft.config import config_from_dict
    from distrib_ft.runtime.loop import train

    t0 = time.time()
    summary = train(config_from_dict(raw))
    return summary, time.time() - t0


def train_and_measure(raw: dict, out: Path) -> dict:
    """Run a job in this process and measure each logged step.

    Per step: wall-clock tokens/s (``tokens_per_second`` of ``metrics.jsonl``) and tokens per CPU-second
    of this process (``time.process_time`` at each logging step), which other processes on a shared
    machine disturb far less than wall time. Log every step (``training.logging_steps: 1``) for per-step numbers.

    Args:
        raw: the job (:func:`job_dict`).
        out: its ``training.output_dir``.

    Returns:
        Per-step lists ``tokens_per_second``, ``loss``, ``tokens`` and ``tokens_per_cpu_second`` (None
        for the first step), ``wall_s`` and the ``records`` of metrics.jsonl that carry throughput.
    """
    from distrib_ft.runtime import metrics as metrics_mod
    from distrib_ft.runtime.metrics import read_metrics

    marks: list[float] = []
    write = metrics_mod.MetricsLog.write

    def write_and_mark(self, record):
        if "tokens_per_second" in record:
            marks.append(time.process_time())
        return write(self, record)

    metrics_mod.MetricsLog.write = write_and_mark
    try:
        _, wall = train_job(raw)
    finally:
        metrics_mod.MetricsLog.write = write
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "tokens_per_second" in r]
    seen = [r["tokens_seen"] for r in recs]
    tokens = [b - a for a, b in zip([0] + seen, seen)]
    cpu = [None] + [b - a for a, b in zip(marks, marks[1:])]
    return {"tokens_per_second": [r["tokens_per_second"] for r in recs], "loss": [r["loss"] for r in recs],
            "tokens": tokens, "tokens_per_cpu_second": [None if c is None else n / c for n, c in zip(tokens, cpu)],
            "wall_s": wall, "records": recs}


# ------------------------------------------------------------------------------------ numbers and records

def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None.

    Args:
        values: numbers, None for "not measured" (e.g. the first step's CPU rate).

    Returns:
        The median, or None when no value is left.
    """
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def with_spread(center: float, values: Sequence[float], spec: str) -> str:
    """A table cell: ``center`` and, when there are several, every value: ``0.52 (0.50/0.54)``.

    Args:
        center: the number shown first (a median or a mean of ``values``).
        values: the values behind it (one per seed or run).
        spec: a ``format`` spec for all of them, e.g. ``".3f"`` or ``"+.1%"``.
    """
    spread = "" if len(values) == 1 else " (" + "/".join(format(v, spec) for v in values) + ")"
    return format(center, spec) + spread


def progress_log(t_start: float) -> Callable[[str], None]:
    """A function that prints ``[  123s] message`` to stderr: seconds since ``t_start``, then the message.

    Args:
        t_start: ``time.time()`` at the start of the bench.
    """
    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    return log


def versions(packages: Sequence[str] = PACKAGES, machine: bool = True) -> dict:
    """Python's and the packages' versions, for a results file.

    Args:
        packages: distributions whose installed version is recorded (None when not installed).
        machine: also the CPU count, architecture and CPU model.

    Returns:
        ``python``, (``cpu_count``, ``machine``,) one key per package (, ``cpu_model``).
    """
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version()}
    if machine:
        out.update(cpu_count=os.cpu_count(), machine=platform.machine())
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if machine:
        try:
            out["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                    if ln.startswith("model name"))
        except (OSError, StopIteration):
            out["cpu_model"] = None
    return out


def command(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """The command line recorded in a results file: ``python bench/SCRIPT ARGS``.

    Args:
        script: the bench script (its file name is used).
        argv: the arguments given to ``main``; None: this process's ``sys.argv[1:]``.
    """
    return f"python bench/{Path(script).name} " + " ".join(sys.argv[1:] if argv is None else argv)


def close_workdir(tmp: tempfile.TemporaryDirectory, keep: bool) -> None:
    """Remove a bench's temporary folder, or keep it and print where it is.

    Args:
        tmp: the folder.
        keep: keep it (the ``--keep`` flag).
    """
    if keep:
        tmp._finalizer.detach()  # type: ignore[attr-defined]
        print(f"kept {tmp.name}", file=sys.stderr)
    else:
        tmp.cleanup()
