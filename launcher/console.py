"""The driver's console under Ray: rank 0's lines and our own; Ray's lines go to Ray's log files.

Follows Ray's logging guide (https://docs.ray.io/en/latest/ray-observability/user-guides/configure-logging.html):
with ``log_to_driver=True`` every line a worker or actor of the job writes to stdout/stderr lands in the session's
``logs/`` folder (``worker-*.out`` / ``worker-*.err``) and is also sent to the driver, which prints it with a
``(Actor pid=N)`` prefix. Here the driver's printer (the handler Ray registers on its stream dispatcher, as
``ray._private.worker.connect`` does) is replaced by :class:`WorkerLines`, which prints only

- rank 0's lines while our worker function runs (:func:`worker_lines` prints a marker line on each stream when
  it starts and another when it ends, so Ray Train's lines before and after stay in the files), without Ray's
  prefix; Ray's and Ray Train's own log records in that process are kept off its stderr (their file handlers
  stay), and Ray's C++ log lines are dropped;
- an error any rank reports (our traceback between two marker lines, prefixed ``(rank N pid=P)``; a rank whose
  error ends like one already shown gets one line).

The Train controller's retries and resource-request tracebacks, the placement-group cleaner, ranks > 0 and Ray's
INFO lines stay in the files. Ray's own driver-side log records (the ``ray`` logger: the token warning, "Started a
local Ray instance", errors pushed to the driver) go to ``distrib-ft-driver-PID.log`` in the same folder.
``--verbose`` (or ``DISTRIB_FT_VERBOSE=1``) leaves Ray's printing as it is (only our marker lines are taken out).

An embedded Ray (:func:`start_embedded`) gets its own folder and ports, and its processes the address of its own
dashboard for Ray's State API (:func:`own_ray_env`), so that two jobs on one machine do not find each other's Ray.

While a placement group of this job waits for resources, :class:`ResourceWait` says what is missing, at most every
30 s ("waiting for 2 workers x 1 CPU; the cluster has 1 CPU free (1 in all)"); Ray Train v2 itself only logs
a timeout and retries (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

VERBOSE_ENV = "DISTRIB_FT_VERBOSE"
RANK_MARK = "::distrib-ft rank {}::"
ERROR_BEGIN, ERROR_END = "::distrib-ft error::", "::distrib-ft error end::"
DONE_MARK = "::distrib-ft done::"
# Ray's C++ log lines ("[2026-11-30 04:55:48,656 E 16657 16684] core_worker.cc:2465: ...") in a worker's stderr
_RAY_CPP = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+\.(cc|h):\d+:")
_RANK_RE = re.compile(r"::distrib-ft rank (\d+)::")
_HANDLER = "distrib_ft_console"


def verbose() -> bool:
    """Whether Ray's own lines are shown (``--verbose``, or ``DISTRIB_FT_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def say(line: str) -> None:
    """One line of ours on the driver's stderr."""
    print(f"distrib-ft: {line}", file=sys.stderr, flush=True)


# -- in the workers ---------------------------------------------------------------------------------------------

def worker_lines(fn: Callable) -> Callable:
    """Decorate a Ray Train worker function: mark this rank's streams first; on an error, print it marked.

    An input error (exit code 2: the driver prints its one line) is not printed; any other error's traceback is
    printed between :data:`ERROR_BEGIN` and :data:`ERROR_END` on stderr, so that the driver shows it whatever the
    rank.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import ray.train

        if not verbose():
            _mute_ray_console()
        mark = RANK_MARK.format(ray.train.get_context().get_world_rank())
        print(mark, flush=True)
        print(mark, file=sys.stderr, flush=True)
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            from launcher.cli import _input_errors

            if not isinstance(e, _input_errors()):
                print("\n".join([ERROR_BEGIN, _retried(e) or traceback.format_exc().rstrip(), ERROR_END]),
                      file=sys.stderr, flush=True)
            raise
        finally:  # what this process prints next is Ray Train's ("Error in training function: ...")
            print(DONE_MARK, flush=True)
            print(DONE_MARK, file=sys.stderr, flush=True)

    return wrapper


def _retried(e: BaseException) -> str | None:
    """One line for a failure the job retries (a peer died or hung, and attempts are left); None otherwise.

    A survivor's gloo traceback ("Connection closed by peer ... GLHF") says nothing the attempt line does not.
    """
    from distrib_ft.runtime import recovery

    attempt = recovery.current()
    if attempt.number >= attempt.of or not recovery.infrastructure(e):
        return None
    text = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{type(e).__name__}: {text} (a worker died or hangs: attempt {attempt.number} of {attempt.of} ends; " \
           "the job retries from its newest checkpoint)"


def worker_env() -> dict[str, str]:
    """Environment for the workers (Ray Train's ``worker_runtime_env``): ``--verbose`` reaches them on a cluster."""
    return {VERBOSE_ENV: "1"} if verbose() else {}


def _mute_ray_console() -> None:
    """In a worker: Ray's and Ray Train's log records go to their files only, not to this process's stderr.

    Ray Train v2 gives the ``ray.train`` logger file handlers and a console handler (its LoggingManager), Ray
    gives ``ray`` a stderr handler; the console handlers are raised past CRITICAL. The root logger (ours, the
    libraries') is left as it is.
    """
    for name in ("ray", "ray.train"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.CRITICAL + 1)


# -- on the driver ----------------------------------------------------------------------------------------------

class WorkerLines:
    """The driver's printer of worker lines (a handler of Ray's stream dispatcher): rank 0's and errors only.

    ``data`` is Ray's batch of one process's lines: ``pid``, ``is_err``, ``lines``, ``actor_name``, ...
    """

    def __init__(self):
        self.ranks: dict = {}  # pid -> rank, from the marker
        self.started: set = set()  # (pid, is_err): streams past their marker
        self.errors: dict = {}  # (pid, is_err) inside an error block -> its lines so far
        self.seen: set = set()  # last lines of the tracebacks shown: the same error of another rank is one line
        self._lock = threading.Lock()

    def __call__(self, data: dict) -> None:
        pid, is_err = data.get("pid"), bool(data.get("is_err"))
        key, shown = (pid, is_err), []
        with self._lock:
            for line in data.get("lines", []):
                text = line.strip()
                m = _RANK_RE.fullmatch(text)
                if m:
                    self.ranks[pid] = int(m[1])
                    self.started.add(key)
                elif text == ERROR_BEGIN:
                    self.errors[key] = []
                elif text == ERROR_END:
                    shown += self._error(pid, self.errors.pop(key, []))
                elif text == DONE_MARK:
                    self.started.discard(key)
                elif key in self.errors:
                    self.errors[key].append(line)
                elif key in self.started and self.ranks.get(pid) == 0 and not _RAY_CPP.match(text):
                    shown.append(line)
        if shown:
            _print({**data, "lines": shown}, sys.stderr if is_err else sys.stdout)

    def _error(self, pid, block: list[str]) -> list[str]:
        """A rank's traceback, prefixed; one line when another rank's ended the same way."""
        prefix = f"(rank {self.ranks.get(pid, '?')} pid={pid}) "
        last = block[-1].strip() if block else ""
        if last in self.seen:
            return [f"{prefix}{last} (as above)"]
        self.seen.add(last)
        return [prefix + line for line in block]


def _print(data: dict, sink) -> None:
    """Print worker lines as Ray does without its prefix (Ray's tqdm_ray bars are drawn, not printed)."""
    try:
        from ray._private.worker import print_worker_logs
    except ImportError:  # another Ray: plain lines
        print("\n".join(data["lines"]), file=sink, flush=True)
        return
    print_worker_logs(data, sink, ignore_prefix=True)
    sink.flush()


def _without_marks(handler: Callable) -> Callable:
    """Ray's own printer (``--verbose``), minus our marker lines."""
    marks = {ERROR_BEGIN, ERROR_END, DONE_MARK}

    def handle(data: dict) -> None:
        lines = [ln for ln in data.get("lines", []) if ln.strip() not in marks and not _RANK_RE.fullmatch(ln.strip())]
        if lines:
            handler({**data, "lines": lines})

    return handle


class Console:
    """The console of one Ray session on the driver.

    In order: :meth:`before_init`, ``ray.init``, :meth:`after_init`, the job, ``ray.shutdown``, :meth:`close`.
    """

    def __init__(self, verbose_: bool | None = None):
        self.verbose = verbose() if verbose_ is None else verbose_
        self.logs: Path | None = None
        self.wait: ResourceWait | None = None
        self._buffer: logging.handlers.MemoryHandler | None = None
        self._file: logging.Handler | None = None
        self._saved: tuple | None = None

    def before_init(self) -> int:
        """Hold the ``ray`` logger's records (init's own included) until the logs folder exists.

        Returns the level to pass to ``ray.init``: INFO (the file gets Ray's INFO lines; the console shows them
        only when verbose).
        """
        if self.verbose:
            return logging.INFO
        logger = logging.getLogger("ray")
        self._saved = (logger.handlers[:], logger.propagate)
        self._buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        logger.handlers, logger.propagate = [self._buffer], False
        return logging.INFO

    def after_init(self, temp_dir: str | None) -> None:
        """Ray is up: move the held records to its logs folder, print worker lines our way, watch for waiting.

        Says where the logs are, in one line.
        """
        import ray

        self.logs = _logs_dir(temp_dir)
        if self._buffer is not None:
            target = self.logs if self.logs is not None and os.access(self.logs, os.W_OK) else Path(temp_dir or "/tmp")
            self._file = logging.FileHandler(target / f"distrib-ft-driver-{os.getpid()}.log")
            self._file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self._buffer.setTarget(self._file)
            self._buffer.flush()
            logging.getLogger("ray").handlers = [self._file]
            self._buffer.close()
            self._buffer = None
        _take_over_printing(self.verbose)
        self.wait = ResourceWait(ray.get_runtime_context().get_job_id())
        self.wait.start()
        where = str(self.logs) if self.logs is not None else "on the cluster's nodes (their session_latest/logs)"
        say(f"Ray's logs: {where}" + ("" if self.verbose else " (Ray's own lines go there; --verbose shows them)"))

    def stop_watching(self) -> None:
        """Stop the resource-wait watcher (before ``ray.shutdown``)."""
        if self.wait is not None:
            self.wait.stop()
            self.wait = None

    def close(self) -> None:
        """After ``ray.shutdown``: give Ray's printing and the ``ray`` logger back as they were."""
        self.stop_watching()
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher

            global_worker_stdstream_dispatcher.remove_handler(_HANDLER)
        except ImportError:
            pass
        if self._saved is not None:
            logger = logging.getLogger("ray")
            logger.handlers, logger.propagate = self._saved
            self._saved = None
        for h in (self._buffer, self._file):
            if h is not None:
                h.close()
        self._buffer = self._file = None


def _logs_dir(temp_dir: str | None) -> Path | None:
    """The session's logs folder on this machine (None for a Ray Client connection: the logs are remote)."""
    try:
        import ray._private.worker as rw

        node = rw._global_node
        if node is not None:
            return Path(node.get_logs_dir_path())
    except (ImportError, AttributeError):
        pass
    return Path(temp_dir) / "session_latest" / "logs" if temp_dir else None


def _take_over_printing(verbose_: bool) -> None:
    """Swap Ray's printer of worker lines (registered by ``ray.init(log_to_driver=True)``) for ours."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        ray_printer = next((h for name, h in dispatcher.handlers if name == "ray_print_logs"), None)
    if ray_printer is None:  # log_to_driver off, or a Ray Client connection
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler(_HANDLER, _without_marks(ray_printer) if verbose_ else WorkerLines())


# -- waiting for resources --------------------------------------------------------------------------------------

def _num(value: float, name: str) -> str:
    if name in ("memory", "object_store_memory"):
        return f"{value / 2**30:.1f} GiB"
    return f"{int(value)}" if float(value).is_integer() else f"{value:g}"


def _amount(value: float, name: str) -> str:
    """``1 CPU``, ``2 GPUs``, ``4.0 GiB memory``, ``1 my_resource``."""
    plural = name in ("CPU", "GPU") and value != 1
    return f"{_num(value, name)} {name}{'s' if plural else ''}"


def waiting_text(bundles: list[dict], available: dict, total: dict) -> str:
    """``waiting for 2 workers x 1 CPU; the cluster has 1 CPU free (1 in all)`` for a pending placement group."""
    first = bundles[0]
    same = all(b == first for b in bundles)
    per = " + ".join(_amount(v, k) for k, v in first.items() if v)
    want = (f"{len(bundles)} worker{'s' if len(bundles) != 1 else ''} x {per}" if same
            else " and ".join(" + ".join(_amount(v, k) for k, v in b.items() if v) for b in bundles))
    names = [k for k in first if first[k]]
    free = ", ".join(f"{_amount(available.get(k, 0), k)} free ({_num(total.get(k, 0), k)} in all)" for k in names)
    return f"waiting for {want}; the cluster has {free}"


class ResourceWait(threading.Thread):
    """Polls this job's placement groups; while one is pending, says what is missing (at most every ``every`` s).

    Ray Train requests its workers' resources as one placement group; one that stays PENDING (or RESCHEDULING,
    after a node was lost) for ``grace`` seconds is waiting for resources the cluster does not have free.
    """

    def __init__(self, job_id_hex: str, interval: float = 2.0, every: float = 30.0, grace: float = 4.0,
                 out: Callable[[str], None] = say):
        super().__init__(name="distrib-ft-resource-wait", daemon=True)
        self.job, self.interval, self.every, self.grace, self.out = job_id_hex, interval, every, grace, out
        self._stop_event = threading.Event()
        self.lines = 0

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=10)

    def pending(self) -> list[dict]:
        """Bundles of this job's placement groups that wait for resources."""
        from ray.util import placement_group_table

        return [pg for pg_id, pg in placement_group_table().items()
                if pg_id.endswith(self.job) and pg.get("state") in ("PENDING", "RESCHEDULING")]

    def run(self) -> None:
        import ray

        since, last = None, float("-inf")
        while not self._stop_event.wait(self.interval):
            try:
                waiting = self.pending()
                if not waiting:
                    since = None
                    continue
                now = time.monotonic()
                since = since if since is not None else now
                if now - since >= self.grace and now - last >= self.every:
                    bundles = [b for _, b in sorted(waiting[0]["bundles"].items())]
                    self.out(waiting_text(bundles, ray.available_resources(), ray.cluster_resources()))
                    self.lines, last = self.lines + 1, now
            except Exception as e:  # the session is ending; a GCS hiccup: try again, never break the job
                logging.getLogger("ray").debug("distrib-ft resource watcher: %s", e)


# -- one embedded Ray among others ------------------------------------------------------------------------------

@contextlib.contextmanager
def own_ray_env(dashboard_port: int) -> Iterator[None]:
    """The environment an embedded Ray's processes start with (set around ``ray.init`` only; they inherit it).

    Ray's State API, which Ray Train's controller and its placement-group cleaner call in their own processes,
    finds its server from ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else by looking for any ``gcs_server``
    process on the machine: with two Rays there ("Found multiple active Ray instances") the cleaner's thread died,
    and a ``RAY_ADDRESS`` of the user's would have pointed them at another cluster. So: our dashboard's address,
    and no ``RAY_ADDRESS`` (``ray.init(address="local")`` itself ignores it).
    """
    saved = {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def failed(e: BaseException) -> bool:
    """Whether ``e`` ends the job as a failure (exit code 1): not an interrupt, not an input error (exit 2)."""
    if not isinstance(e, Exception):
        return False
    from launcher.cli import EXIT_FAILED, _failure

    return _failure(e)[0] == EXIT_FAILED


def start_embedded(num_cpus: int, level: int) -> str:
    """``ray.init`` of an embedded Ray in a new ``/tmp/dft-ray-*`` folder (its own ports); returns the folder.

    Ray waits a fixed 30 s for its raylet to register ("The current node timed out during startup"); on a busy
    machine that can pass. Then the processes of that try are ended by PID and Ray is started once more. A
    failure that stays keeps the folder and names its logs on the exception (``ray_logs``).
    """
    import shutil
    import tempfile

    import ray

    from distrib_ft.runtime.dist import free_port

    for attempt in (1, 2):
        # Short path: Ray's unix sockets live under it and are limited to ~107 characters.
        tmp = tempfile.mkdtemp(prefix="dft-ray-", dir="/tmp")
        dashboard = free_port()  # the dashboard serves Ray's State API, which Ray Train's controller polls
        try:
            with own_ray_env(dashboard):
                ray.init(address="local", num_cpus=num_cpus, _temp_dir=tmp, include_dashboard=True,
                         dashboard_port=dashboard, logging_level=level, log_to_driver=True)
            return tmp
        except Exception as e:
            ray.shutdown()
            end_processes_under(tmp)
            if attempt == 1 and "timed out during startup" in str(e):
                say("the embedded Ray did not start within Ray's 30 s (a busy machine?); starting it again")
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            e.ray_logs = f"Ray's logs, kept, in {Path(tmp) / 'session_latest' / 'logs'}"
            raise
    raise AssertionError("unreachable")


def end_processes_under(folder: str) -> list[int]:
    """SIGKILL the live processes whose command line names ``folder`` (a Ray of ours that did not start)."""
    import signal

    ended = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if folder in cmd:
                os.kill(int(pid), signal.SIGKILL)
                ended.append(int(pid))
        except (OSError, ProcessLookupError):
            continue
    return ended
