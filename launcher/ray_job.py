"""Run the training loop on Ray Train workers: an embedded local Ray by default, or an existing cluster.

The embedded Ray gets its own temporary directory and free ports, and is shut down (every process
it started, by its own bookkeeping) when the job ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from distrib_ft.job import Job
from distrib_ft.runtime import dist


def _worker_loop(payload: dict) -> None:
    """Runs in each Ray Train worker: the process group exists; hand the resolved job to the job function."""
    import ray.train

    ctx = ray.train.get_context()
    os.environ.update({"RANK": str(ctx.get_world_rank()), "LOCAL_RANK": str(ctx.get_local_rank()),
                       "WORLD_SIZE": str(ctx.get_world_size()), "DISTRIB_FT_IN_RAY": "1"})
    payload["fn"](payload["job"], **payload["kwargs"])


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[bool]:
    """Connect to ``address``, or start an embedded Ray; yields whether the cluster has GPUs."""
    import ray

    tmp = None
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        # Short path: Ray's unix sockets live under it and are limited to ~107 characters.
        tmp = tempfile.mkdtemp(prefix="dft-ray-", dir="/tmp")
        # The dashboard serves Ray's State API, which Ray Train's controller polls.
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=tmp, include_dashboard=True,
                 dashboard_port=dist.free_port(), logging_level=logging.WARNING, log_to_driver=True)
    try:
        yield ray.cluster_resources().get("GPU", 0) > 0
    finally:
        ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run_on_ray(job: Job, fn: Callable, *, address: str | None = None, kwargs: dict | None = None) -> None:
    """Run ``fn(job, **kwargs)`` (a job of distrib_ft.jobs.JOBS) on ``distributed.num_workers`` Ray Train workers.

    Raises:
        WorkerError: a worker failed; carries the workers' first error.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    trainer_cls = _trainer_class()

    dcfg = job.config.distributed
    needed = dcfg.num_workers * dcfg.cpus_per_worker
    with ray_session(address, num_cpus=max(os.cpu_count() or 1, needed)) as has_gpu:
        use_gpu = has_gpu if dcfg.use_gpu == "auto" else bool(dcfg.use_gpu)
        if use_gpu and not has_gpu:
            raise RuntimeError("distributed.use_gpu: true but the Ray cluster has no GPU; set it to auto or false")
        backend = dcfg.backend if dcfg.backend != "auto" else ("nccl" if use_gpu else "gloo")
        storage = Path(tempfile.mkdtemp(prefix="dft-train-"))
        trainer = trainer_cls(
            _worker_loop,
            train_loop_config={"job": job, "fn": fn, "kwargs": kwargs or {}},
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(num_workers=dcfg.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": dcfg.cpus_per_worker}),
            run_config=RunConfig(name="distrib-ft", storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=0),
                                 worker_runtime_env={"env_vars": {
                                     **dist.worker_env(dcfg.cpus_per_worker, use_gpu),
                                     "DISTRIB_FT_PROGRESS": "bar" if sys.stderr.isatty() else "log"}}),
        )
        try:
            trainer.fit()
        except Exception as e:  # Ray wraps the worker's exception; surface the first one
            if trainer.interrupted:
                raise KeyboardInterrupt from None
            raise WorkerError(_first_worker_error(e)) from e
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        if trainer.interrupted:  # aborted by Ctrl-C: the CLI prints "interrupted" and exits 130
            raise KeyboardInterrupt


def _trainer_class():
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        """Ray's TorchTrainer with our Ctrl-C.

        Ray's own SIGINT handler aborts the run, then exits the driver with status 0/1 from inside the handler,
        so the CLI could not report 130 "interrupted". Ours aborts the same way (the controller stops the
        workers; Ray's processes are cleaned up) and records it; a third Ctrl-C stops waiting.
        """

        interrupted = False

        def _register_sigint_handler(self, controller) -> None:  # overrides Ray Train v2's (private) hook
            import ray

            def on_sigint(signum, frame):
                self.interrupted = True
                self._sigints = getattr(self, "_sigints", 0) + 1
                if self._sigints >= 3:
                    raise KeyboardInterrupt
                if self._sigints == 1:
                    print("distrib-ft: stopping the workers (Ctrl-C twice more to stop waiting)",
                          file=sys.stderr, flush=True)
                    try:
                        ray.get(controller.abort.remote())
                    except ray.exceptions.RayActorError:
                        pass

            signal.signal(signal.SIGINT, on_sigint)

    return Trainer


class WorkerError(RuntimeError):
    """A Ray worker failed; ``cause`` is the worker's own exception when Ray kept it."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def _first_worker_error(e: BaseException) -> BaseException:
    failures = getattr(e, "worker_failures", None)
    if failures:
        e = failures[min(failures)]
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if inner is None or not isinstance(inner, BaseException):
            break
        e = inner
    return e
