"""What a run tells its user: metrics.jsonl (rank 0), and a progress bar that works in Ray workers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from distrib_ft.runtime import dist


class StepWindow:
    """Sums over the optimizer steps since the last metrics.jsonl line; ``record`` makes the line.

    ``nll`` is this rank's sum of target-token NLL; ``targets`` and ``tokens`` are global counts (already
    all-reduced by the loop). Time spent inside :meth:`paused` (evaluations, checkpoints) does not count.
    """

    def __init__(self) -> None:
        self.nll, self.targets, self.tokens, self.steps = 0.0, 0, 0, 0
        self.start = time.time()

    def add_step(self, *, targets: float, tokens: float) -> None:
        self.targets += int(targets)
        self.tokens += int(tokens)
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        began = time.time()
        try:
            yield
        finally:
            self.start += time.time() - began

    def record(self, step: int, *, learning_rate: float, grad_norm, tokens_seen: int) -> dict:
        """The metrics.jsonl line for ``step``. Collective.

        Keys: ``loss`` (mean target-token NLL over all ranks), ``learning_rate``, ``grad_norm``,
        ``tokens_per_second`` (all ranks, training time only), ``tokens_seen``.
        """
        nll = dist.all_reduce_sum([self.nll])[0]
        return {"step": step, "loss": nll / max(self.targets, 1), "learning_rate": learning_rate,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_second": self.tokens / max(time.time() - self.start, 1e-9), "tokens_seen": tokens_seen}


class MetricsLog:
    """Append-only JSON lines, one object per logging step, written by rank 0.

    On resume, lines past the resumed step are dropped first (rewritten atomically), so that the
    file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None,
                 report_to: list[str] = (), run_name: str = "distrib-ft", params: dict | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.loggers = []
        if not enabled:
            return
        self.loggers = [_LOGGERS[name](self.path.parent, run_name, params or {}) for name in report_to]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            from distrib_ft.runtime.checkpoint import atomic_write_text

            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        scalars = {k: float(v) for k, v in clean.items() if k != "step" and isinstance(v, (int, float))}
        for logger in self.loggers:
            logger.log(scalars, clean["step"])

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class _TensorBoard:
    def __init__(self, output_dir: Path, run_name: str, params: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "runs"))
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=1) + "\n```")

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, output_dir: Path, run_name: str, params: dict):
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store in output_dir by default
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it, in maintenance mode
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "distrib-ft"))
        self.mlflow, self.run = mlflow, mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)  # MLflow allows "/" in names: the same as metrics.jsonl

    def close(self) -> None:
        self.mlflow.end_run()


_LOGGERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow}


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, one dict per non-blank line, in file order."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


class Timings:
    """Wall-clock seconds per phase of a job on this rank, for the line at the end and summary.json.

    ``lap(name)`` books the time since the previous lap; ``phase(name)`` books a block on its own and keeps it
    out of the enclosing lap (evaluations and checkpoints inside the training lap).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.time()

    def lap(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    @contextlib.contextmanager
    def phase(self, name: str):
        began = time.time()
        try:
            yield
        finally:
            spent = time.time() - began
            self.seconds[name] = self.seconds.get(name, 0.0) + spent
            self.last += spent



class Progress:
    """Progress on rank 0: a bar (step, loss, tokens/s, ETA) on a terminal, log lines otherwise.

    ``DISTRIB_FT_PROGRESS`` (bar | log) decides; by default a bar when stderr is a terminal. The Ray
    launcher sets it from the driver's terminal; in a Ray worker the bar is Ray's ``tqdm_ray``, which
    the driver renders (a plain tqdm's carriage returns would arrive as garbled log lines).
    """

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        mode = os.environ.get("DISTRIB_FT_PROGRESS") or ("bar" if sys.stderr.isatty() else "log")
        self.enabled, self.bar, self.desc, self.total, self.done = enabled, None, desc, total, initial
        if not enabled or mode != "bar":
            return
        if os.environ.get("DISTRIB_FT_IN_RAY") == "1":
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=total, desc=desc)
            self.bar.update(initial)
        else:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int, record: dict | None = None) -> None:
        """Advance by ``n`` and show ``record`` (a metrics.jsonl line) if given.

        Without a bar, a log line per record, or, for work without records, one at every tenth of the total.
        """
        if not self.enabled:
            return
        before, self.done = self.done, self.done + n
        if self.bar is None:
            if record is not None:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                      file=sys.stderr, flush=True)
            elif self.done * 10 // max(self.total, 1) > before * 10 // max(self.total, 1):
                print(f"{self.desc}: {self.done}/{self.total}", file=sys.stderr, flush=True)
            return
        self.bar.update(n)
        if record is not None:
            self.bar.set_description(f"{self.desc} [loss={record['loss']:.4g} tok/s={record['tokens_per_second']:.0f}]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
