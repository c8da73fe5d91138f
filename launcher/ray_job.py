"""Run the training loop on Ray Train workers: an embedded local Ray by default, or an existing cluster.

The embedded Ray gets its own temporary directory and free ports, and is shut down (every process
it started, by its own bookkeeping) when the job ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from distrib_ft.job import Job
from distrib_ft.runtime import dist, recovery
from distrib_ft.runtime.storage import forward_env as storage_env
from launcher import console


@console.worker_lines  # its rank's lines marked for the driver's console; an error printed whatever the rank
def _worker_loop(payload: dict) -> None:
    """Runs in each Ray Train worker: the process group exists; hand the resolved job to the job function."""
    import ray.train

    ctx = ray.train.get_context()
    os.environ.update({"RANK": str(ctx.get_world_rank()), "LOCAL_RANK": str(ctx.get_local_rank()),
                       "WORLD_SIZE": str(ctx.get_world_size()), "DISTRIB_FT_IN_RAY": "1"})
    kwargs = dict(payload["kwargs"])
    if "resume" in kwargs and recovery.current().restarted:  # Ray restarted the group: continue this run
        kwargs["resume"] = True
    recovery.set_collective_timeout(payload["job"].config.distributed.collective_timeout_s)  # DeepSpeed's groups too
    try:
        payload["fn"](payload["job"], **kwargs)
    except Exception as e:
        clear = recovery.explain(e, payload["job"].config.distributed.collective_timeout_s)
        if clear is None:
            raise
        print(f"distrib-ft: rank {ctx.get_world_rank()}: {clear}", file=sys.stderr, flush=True)
        raise clear from e


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[bool]:
    """Connect to ``address``, or start an embedded Ray; yields whether the cluster has GPUs.

    The console shows rank 0's lines and ours only, Ray's go to its logs folder (launcher/console.py; all of
    them with ``--verbose``). When the job fails (exit code 1) the embedded Ray's folder is kept, and the exception
    carries ``ray_logs``, a note naming its logs folder, for the error line.
    """
    import ray

    tmp, con, keep = None, console.Console(), False
    level = con.before_init()
    try:
        if address:
            ray.init(address=address, logging_level=level, log_to_driver=True)
        else:
            if num_cpus > (os.cpu_count() or 1):
                console.say(f"the job asks for {num_cpus} CPUs (distributed.num_workers x cpus_per_worker); this "
                            f"machine has {os.cpu_count()}: the embedded Ray offers {num_cpus}, the workers share "
                            "the cores")
            tmp = console.start_embedded(num_cpus, level)  # its own folder and ports; our State API address
        con.after_init(tmp)
        yield ray.cluster_resources().get("GPU", 0) > 0
    except BaseException as e:
        keep = tmp is not None and console.failed(e)
        if con.logs is not None and console.failed(e):
            e.ray_logs = f"Ray's logs{', kept,' if keep else ''} in {con.logs}"
        raise
    finally:
        con.stop_watching()
        ray.shutdown()
        con.close()
        if tmp and not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def run_on_ray(job: Job, fn: Callable, *, address: str | None = None, kwargs: dict | None = None) -> list[dict]:
    """Run ``fn(job, **kwargs)`` (a job of distrib_ft.jobs.JOBS) on ``distributed.num_workers`` Ray Train workers.

    A worker that dies or fails restarts the group up to ``distributed.max_failures`` times; a restarted train job
    resumes from its newest complete checkpoint (distrib_ft/runtime/recovery.py).

    Returns:
        The attempts, ``[{"attempt": 1, "error": "a worker died (...)"}, ...]`` (error None for the last).

    Raises:
        WorkerError: a worker failed (and no restart is left); carries the workers' first error and the attempts.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from launcher.ray_netif import NodeAwareTorchConfig  # GLOO/NCCL_SOCKET_IFNAME per worker, across nodes

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
            torch_config=NodeAwareTorchConfig(backend=backend, timeout_s=dcfg.collective_timeout_s),
            scaling_config=ScalingConfig(num_workers=dcfg.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": dcfg.cpus_per_worker}),
            run_config=RunConfig(name="distrib-ft", storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=dcfg.max_failures),
                                 callbacks=[recovery.ledger_callback(dcfg.max_failures, storage / "attempts.json")],
                                 worker_runtime_env={"env_vars": {
                                     **dist.worker_env(dcfg.cpus_per_worker, use_gpu),
                                     # a URL output_dir: the driver's AWS variables (runtime/storage.py)
                                     **storage_env(job.config.training.output_dir),
                                     **console.worker_env(),  # --verbose: Ray's lines of rank 0 too
                                     "DISTRIB_FT_PROGRESS": "bar" if sys.stderr.isatty() else "log"}}),
        )
        try:
            trainer.fit()
        except Exception as e:  # Ray wraps the worker's exception; surface the first one (a death: which worker)
            if trainer.interrupted:
                raise KeyboardInterrupt from None
            raise WorkerError(recovery.main_error(e) or _first_worker_error(e),
                              attempts=recovery.read_ledger(storage / "attempts.json")) from e
        else:
            attempts = recovery.read_ledger(storage / "attempts.json")
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        if trainer.interrupted:  # aborted by Ctrl-C: the CLI prints "interrupted" and exits 130
            raise KeyboardInterrupt
        return attempts


def _trainer_class():
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        """Ray's TorchTrainer with our Ctrl-C.

        Ray's own SIGINT handler aborts the run, then exits the driver with status 0/1 from inside the handler,
        so the CLI could not report 130 "interrupted". Ours aborts the same way (the controller stops the
        workers; Ray's processes are cleaned up) and records it; a third Ctrl-C stops waiting. And with our failure
        policy: an input error on a worker is not retried (recovery.failure_policy).
        """

        interrupted = False

        def _initialize_and_run_controller(self, **kwargs):  # overrides Ray Train v2's (private) hook
            kwargs["failure_policy"] = recovery.failure_policy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

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

    def __init__(self, cause: BaseException, attempts: list[dict] | None = None):
        super().__init__(str(cause))
        self.cause = cause
        self.attempts = attempts or []  # Ray Train's attempts: [{"attempt", "error"}] (recovery.read_ledger)


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
