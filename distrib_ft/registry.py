"""The model registry: versions of a retrained model with their lineage, and the ``current`` (production) pointer.

A registry is a folder or a URL (s3://, gs://, hdfs://; through distrib_ft/runtime/storage.py, pyarrow.fs as Ray
Train's persistent storage uses it: https://docs.ray.io/en/latest/train/user-guides/persistent-storage.html)::

    REGISTRY/
      versions/v0001/model/...      the artifact: a copy of a job's final/ (or rejected/): a peft adapter or a model
      versions/v0001/version.json   version, round, parent, data files (sha256), the resolved job, metrics,
                                    decision, created (UTC), the artifact's files; written LAST: it is the marker
      current.json                  the pointer: current version, the promotion stack, the log of every change
      lock.json                     while an operation holds the registry: owner pid / host / time, lease expiry

A version folder without ``version.json`` is an interrupted ``add`` and is not listed. ``current.json`` is one
file written atomically (a temp file then a rename locally; one object PUT on S3, which is atomic), and only by
:meth:`Registry.promote` and :meth:`Registry.rollback`: a killed promote leaves the old pointer (the pointer is the
commit point; ``version.json``'s decision is rewritten after it and read back through the pointer). A version's
decision is ``candidate`` (added), ``refused`` (:meth:`Registry.refuse`; stays listed, never current unless
promoted with ``force``) or ``promoted`` (it has been current at least once).

The lock (:class:`RegistryLock`): every write (add, refuse, promote, rollback) holds ``lock.json``, so two pipelines
on one registry never promote (or number a version) at once. Its holder renews the lease from a thread every
``lease / 3`` seconds. A lock is *stale*, and taken over, when its holder's pid is gone on this same host (checked
with ``kill(pid, 0)``: a crash is seen at once) or its lease has expired (the only test across hosts, which share
no pid space: a crashed holder elsewhere blocks others for at most ``lease`` seconds). How a claim is made atomic:

- a local folder: the read-decide-write of ``lock.json`` runs under ``fcntl.flock`` of ``lock.json.guard`` (held for
  milliseconds; the kernel drops it when its process dies, so it never sticks). Mutual exclusion is exact.
- an object store: pyarrow.fs has no conditional PUT (If-None-Match), so: read; if free or stale, PUT our claim;
  wait ``settle`` seconds; read again: the claim is ours only if the object still names our token (S3 is strongly
  read-after-write consistent, last writer wins). This excludes a second holder provided no contender takes longer
  than ``settle`` (default 2 s) between its read of a free lock and its PUT; a paused holder whose lease ran out
  loses the lock without knowing, so the pointer write re-reads the lock just before it (a fence that narrows,
  not closes, that window). It is a lease with a timing assumption, not a consensus lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from distrib_ft.runtime import storage
from distrib_ft.runtime.storage import COMPLETE, UrlPath, as_path, atomic_write_text

VERSION_FILE = "version.json"
POINTER = "current.json"
LOCK = "lock.json"
MODEL = "model"
DECISIONS = ("candidate", "refused", "promoted")
_NAME = re.compile(r"^v(\d{4,})$")


class RegistryError(ValueError):
    """A registry input error (unknown version, empty registry, a refused version to promote); one line."""


class LockTimeout(RegistryError):
    """Another live holder kept the registry's lock past the wait; names it."""


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _name(version: int | str) -> str:
    """``3``, ``"3"``, ``"v3"``, ``"v0003"`` -> ``"v0003"``."""
    s = str(version).strip()
    s = s[1:] if s[:1] in "vV" else s
    if not s.isdigit():
        raise RegistryError(f"{version!r}: not a version (expected v0003, v3 or 3)")
    return f"v{int(s):04d}"


def file_sha256(path) -> str:
    """sha256 of a file (local or URL); of a folder: of its sorted ``relative path, NUL, file sha256`` lines."""
    p = as_path(path)
    if isinstance(p, UrlPath):
        if p.is_dir():
            return _tree_hash({rel: file_sha256(p / rel) for rel in p.files()})
        if not p.is_file():
            raise RegistryError(f"{p}: data file not found")
        fs, inner = p._fs()
        h = hashlib.sha256()
        with fs.open_input_stream(inner) as f:  # streamed: data files may be large
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if p.is_dir():
        return _tree_hash({f.relative_to(p).as_posix(): file_sha256(f) for f in sorted(p.rglob("*")) if f.is_file()})
    if not p.is_file():
        raise RegistryError(f"{p}: data file not found")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_hash(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}\0{files[k]}\n" for k in sorted(files)).encode()).hexdigest()


def _read_json(path) -> dict | None:
    p = as_path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RegistryError(f"{p}: invalid JSON ({e}); restore it or remove the registry entry") from None


@dataclass
class Version:
    """One registry version: its ``version.json`` fields, whether it is current, and where it lives."""

    version: str
    round: str | None
    parent: str | None
    decision: str
    created: str
    current: bool
    path: str
    model: str
    record: dict = field(repr=False)

    def as_dict(self) -> dict:
        """``version.json`` with ``current``, ``path`` and ``model`` added (what ``registry show --json`` prints)."""
        return {**self.record, "decision": self.decision, "current": self.current, "path": self.path,
                "model": self.model}


class RegistryLock:
    """The registry's lease lock (``lock.json``); see the module docstring for the claim and the takeover rules.

    Args:
        root: the registry (Path or UrlPath).
        lease: seconds a claim lives without a renewal (renewed every ``lease / 3`` s while held).
        wait: seconds :meth:`acquire` waits for a live holder before raising :class:`LockTimeout`.
        settle: object stores only: seconds between the PUT of a claim and the read that confirms it.
        purpose: a word saved in the lock (``promote``, ``add``, a pipeline's round) for whoever waits.
    """

    def __init__(self, root, *, lease: float = 300.0, wait: float = 60.0, settle: float = 2.0,
                 purpose: str = "registry"):
        self.root, self.path = root, root / LOCK
        self.lease, self.wait, self.settle, self.purpose = float(lease), float(wait), float(settle), purpose
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None  # the stale claim this holder replaced, if any

    # ---------------------------------------------------------------------------------------- claims
    def _claim(self) -> dict:
        t = time.time()
        return {"token": self.token, "pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "acquired": now(), "renewed": t, "expires": t + self.lease, "lease_s": self.lease}

    @staticmethod
    def stale_reason(claim: dict, at: float | None = None) -> str | None:
        """Why ``claim`` no longer holds the lock (its pid gone on this host, or its lease expired), or None."""
        at = time.time() if at is None else at
        if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
            try:
                os.kill(claim["pid"], 0)
            except ProcessLookupError:
                return f"pid {claim['pid']} is gone on {claim['host']}"
            except PermissionError:  # alive, another user's
                pass
        if float(claim.get("expires", 0)) < at:
            return f"its lease expired at {time.strftime('%H:%M:%SZ', time.gmtime(float(claim.get('expires', 0))))}"
        return None

    def _read(self) -> dict | None:
        try:
            return json.loads(as_path(self.path).read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # a torn local write cannot happen (rename); treat garbage as stale
            return {"token": None, "expires": 0}

    @contextlib.contextmanager
    def _guard(self):
        """Locally: ``flock`` of ``lock.json.guard`` around a read-decide-write of the lock; on a URL: nothing."""
        if isinstance(self.root, UrlPath):
            yield
            return
        import fcntl

        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(LOCK + ".guard"), "a+") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def _try_local(self) -> dict | None:
        with self._guard():
            held = self._read()
            if held is not None and held.get("token") != self.token and self.stale_reason(held) is None:
                return held
            if held is not None and held.get("token") != self.token:
                self.took_over = {**held, "reason": self.stale_reason(held)}
            atomic_write_text(self.path, json.dumps(self._claim(), indent=2) + "\n")
            return None

    def _try_store(self) -> dict | None:
        held = self._read()
        if held is not None and held.get("token") != self.token and self.stale_reason(held) is None:
            return held
        stale = {**held, "reason": self.stale_reason(held)} if held is not None else None
        atomic_write_text(self.path, json.dumps(self._claim(), indent=2) + "\n")
        time.sleep(self.settle)
        again = self._read()
        if again is None or again.get("token") != self.token:  # another claim landed after ours: theirs
            return again or {"token": None, "purpose": "unknown", "expires": time.time() + self.settle}
        self.took_over = stale
        return None

    def _try(self) -> dict | None:
        """Claim the lock once: None when this holder has it, else the live holder's claim."""
        return self._try_store() if isinstance(self.root, UrlPath) else self._try_local()

    # -------------------------------------------------------------------------------------- public
    def acquire(self) -> RegistryLock:
        """Take the lock, waiting up to ``wait`` s for a live holder; start the renewal thread.

        Raises:
            LockTimeout: another live holder kept it (names its pid, host, purpose and lease expiry).
        """
        self.token = uuid.uuid4().hex
        deadline = time.monotonic() + self.wait
        delay = 0.05
        said = False
        while True:
            held = self._try()
            if held is None:
                break
            if not said and self.wait > 0:  # one line for whoever waits (a pipeline, `registry promote`)
                said = True
                print(f"waiting for {self.root}'s lock, held by pid {held.get('pid')} on {held.get('host')} since "
                      f"{held.get('acquired')} ({held.get('purpose')}); up to {self.wait:g} s", file=sys.stderr,
                      flush=True)
            if time.monotonic() >= deadline:
                self.token = None
                expires = time.strftime("%H:%M:%SZ", time.gmtime(float(held.get("expires", 0))))
                raise LockTimeout(f"{self.path}: held by pid {held.get('pid')} on {held.get('host')} "
                                  f"({held.get('purpose')}, since {held.get('acquired')}, lease until {expires}); "
                                  f"waited {self.wait:.0f} s: retry later (a crashed holder's lease runs out)")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="registry-lock-renew", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            with contextlib.suppress(Exception):
                self.renew()

    def renew(self) -> None:
        """Push the lease's expiry ``lease`` seconds ahead (only while this holder's token is in the lock)."""
        with self._guard():  # locally exact; on a URL a taker may land between the read and the PUT (see above)
            claim = self._read()
            if self.token is not None and claim is not None and claim.get("token") == self.token:
                atomic_write_text(self.path, json.dumps({**claim, "renewed": time.time(),
                                              "expires": time.time() + self.lease}, indent=2) + "\n")

    def held(self) -> bool:
        """Whether ``lock.json`` still names this holder (the fence re-read before the pointer is written)."""
        claim = self._read()
        return claim is not None and self.token is not None and claim.get("token") == self.token

    def release(self) -> None:
        """Stop renewing and delete ``lock.json`` if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._guard():
            if self.token is not None and self.held():
                as_path(self.path).unlink(missing_ok=True)
        self.token = None

    def __enter__(self) -> RegistryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Registry:
    """A model registry on a local folder or a URL (see the module docstring for the layout and the guarantees).

    Args:
        root: the registry folder or URL (made on the first :meth:`add`).
        lease, wait, settle: the lock's (:class:`RegistryLock`).
    """

    def __init__(self, root, *, lease: float = 300.0, wait: float = 60.0, settle: float = 2.0):
        p = as_path(root)
        self.root = p if isinstance(p, UrlPath) else Path(os.path.abspath(p))
        self.lease, self.wait, self.settle = lease, wait, settle
        self._lock: RegistryLock | None = None
        self._depth = 0
        self._rlock = threading.RLock()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ------------------------------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, purpose: str = "registry"):
        """Hold the registry's lock for a block (re-entrant in this object): ``with reg.lock("round r2"): ...``."""
        with self._rlock:
            if self._depth == 0:
                self._lock = RegistryLock(self.root, lease=self.lease, wait=self.wait, settle=self.settle,
                                          purpose=purpose).acquire()
            self._depth += 1
            try:
                yield self._lock
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._lock.release()
                    self._lock = None

    # ------------------------------------------------------------------------------------------ reads
    def _version_dir(self, name: str):
        return self.root / "versions" / name

    def _names(self, complete: bool = True) -> list[str]:
        folder = self.root / "versions"
        if not folder.is_dir():
            return []
        names = [p.name for p in folder.iterdir() if _NAME.match(p.name)]
        if complete:
            names = [n for n in names if (self._version_dir(n) / VERSION_FILE).is_file()]
        return sorted(names, key=lambda n: int(n[1:]))

    def pointer(self) -> dict:
        """``current.json``: ``{"version": ..., "stack": [...], "log": [...]}`` (an empty one before any promote)."""
        return _read_json(self.root / POINTER) or {"version": None, "stack": [], "log": []}

    def _version(self, name: str, pointer: dict) -> Version:
        folder = self._version_dir(name)
        record = _read_json(folder / VERSION_FILE)
        if record is None:
            raise RegistryError(self._unknown(name))
        ever = {e["version"] for e in pointer.get("log", []) if e.get("action") in ("promote", "rollback")}
        decision = "promoted" if name in ever else record.get("decision", "candidate")
        return Version(version=name, round=record.get("round"), parent=record.get("parent"), decision=decision,
                       created=record.get("created"), current=pointer.get("version") == name, path=str(folder),
                       model=str(folder / MODEL), record=record)

    def _unknown(self, name: str) -> str:
        names = self._names()
        if not names:
            return f"{self.root}: empty registry (no versions; add one first)"
        return f"{self.root}: no version {name} (versions: {', '.join(names)})"

    def list(self) -> list[Version]:
        """Every complete version, oldest first."""
        pointer = self.pointer()
        return [self._version(n, pointer) for n in self._names()]

    def show(self, version) -> Version:
        """One version. Raises RegistryError: unknown version, or an empty registry."""
        return self._version(_name(version), self.pointer())

    def current(self) -> Version | None:
        """The version in production, or None before the first promote."""
        pointer = self.pointer()
        return self._version(pointer["version"], pointer) if pointer.get("version") else None

    # ----------------------------------------------------------------------------------------- writes
    def add(self, final_dir, *, round: str, parent=None, data_files=(), job_config=None, verdict=None,
            metrics: dict | None = None) -> Version:
        """Copy a job's final/ (or rejected/) into a new version ``candidate`` (the pointer does not move).

        Args:
            final_dir: the artifact: a peft adapter folder or a model folder (local or URL; a URL one must carry
                its ``COMPLETE`` marker).
            round: the round's name.
            parent: the version it was trained from; default the current one (None on an empty registry).
            data_files: the round's data files (local or URLs; folders too), recorded with sha256.
            job_config: the resolved job: a dict, a YAML string or a path to ``config.yaml``; default the
                ``config.yaml`` beside ``final_dir``.
            verdict: a verdict dict or the path of its folder; default the ``verdict.json`` beside ``final_dir``.
                Its metrics (and summary.json's / report.json's beside it) are recorded.
            metrics: more metrics to record (the gate's numbers), merged over those.

        Raises:
            RegistryError: no artifact there, an unknown parent, a missing data file.
        """
        src = as_path(final_dir)
        if not storage.artifact_exists(src) or not ((src / "adapter_config.json").is_file()
                                                    or (src / "config.json").is_file()):
            raise RegistryError(f"{src}: not a model artifact (no adapter_config.json or config.json; on a URL, "
                                "no COMPLETE marker); pass a job's final/ folder")
        run = src.parent
        with self.lock(f"add {round}"):
            pointer = self.pointer()
            if parent is None:
                parent = pointer.get("version")
            else:
                parent = _name(parent)
                self._version(parent, pointer)  # must exist
            data = [{"path": str(f), "sha256": file_sha256(f)} for f in map(str, data_files)]
            taken = self._names(complete=False)
            name = _name(int(taken[-1][1:]) + 1 if taken else 1)
            record = {
                "version": name, "round": round, "parent": parent, "decision": "candidate", "created": now(),
                "source": str(src), "data_files": data, "job": _job_text(job_config, run),
                "metrics": {**_metrics(verdict, run), **(metrics or {})},
            }
            files = self._copy_artifact(src, self._version_dir(name))
            kind = "adapter" if "adapter_config.json" in files else "full"
            record["artifact"] = {"kind": kind, "path": MODEL, "files": files, "bytes": sum(files.values())}
            atomic_write_text(self._version_dir(name) / VERSION_FILE, json.dumps(record, indent=2) + "\n")  # the marker
            if not isinstance(self.root, UrlPath):
                _fsync_dir(self._version_dir(name))
            return self._version(name, pointer)

    def _copy_artifact(self, src, dest) -> dict[str, int]:
        """Copy ``src`` to ``dest/model`` (a fresh folder); returns ``{relative path: size}`` of the copy."""
        with tempfile.TemporaryDirectory(prefix="registry-") as tmp:
            if isinstance(src, UrlPath):
                storage.download_tree(src, Path(tmp) / MODEL)
                (Path(tmp) / MODEL / COMPLETE).unlink(missing_ok=True)
                local_src = Path(tmp) / MODEL
            else:
                local_src = Path(src)
            files = {p.relative_to(local_src).as_posix(): p.stat().st_size for p in sorted(local_src.rglob("*"))
                     if p.is_file() and p.name != COMPLETE and not p.name.startswith(".")}
            if isinstance(dest, UrlPath):
                storage.upload_tree(local_src, dest / MODEL)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                staging = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(local_src, staging / MODEL,
                                ignore=lambda d, names: [n for n in names if n == COMPLETE or n.startswith(".")])
                storage.plain_modes(staging, tree=True)  # copytree keeps final/'s 0700 and safetensors' 0600
                os.rename(staging, dest)  # fails if dest exists: a version number is never reused
        return files

    def _set_decision(self, name: str, decision: str, **fields) -> None:
        path = self._version_dir(name) / VERSION_FILE
        record = _read_json(path)
        record.update(decision=decision, **fields)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")

    def refuse(self, version, *, reason: str, details: dict | None = None) -> Version:
        """Mark a candidate ``refused`` (the gate said no): it stays listed, the pointer does not move.

        Raises:
            RegistryError: unknown version, or the version is current / was promoted.
        """
        name = _name(version)
        with self.lock(f"refuse {name}"):
            v = self._version(name, self.pointer())
            if v.decision == "promoted":
                raise RegistryError(f"{self.root}: {name} was promoted; roll back instead of refusing it")
            self._set_decision(name, "refused", refused={"reason": reason, "time": now(), **(details or {})})
            return self.show(name)

    def promote(self, version, *, force: bool = False, note: str | None = None,
                before_commit=None) -> Version:
        """Make ``version`` current: one atomic write of ``current.json`` under the lock.

        Args:
            version: ``v0003``, ``v3`` or ``3``.
            force: promote a ``refused`` version anyway (recorded in the log as forced).
            note: recorded in the log (the gate's summary, who asked).
            before_commit: called with the version's record under the lock, after the checks and just before
                the pointer is written; raising there leaves the pointer as it was (the pipeline's last check).

        Raises:
            RegistryError: unknown version, a refused one without ``force``, or the lock lost before the write.
        """
        name = _name(version)
        with self.lock(f"promote {name}") as lk:
            pointer = self.pointer()
            v = self._version(name, pointer)
            if v.decision == "refused" and not force:
                why = (v.record.get("refused") or {}).get("reason") or "its gate"
                raise RegistryError(f"{self.root}: {name} was refused ({why}); a refused version is never made "
                                    "current unless you pass --force")
            if pointer.get("version") == name:
                return v
            if before_commit is not None:
                before_commit(v.record)
            entry = {"action": "promote", "version": name, "from": pointer.get("version"), "time": now(),
                     "by": f"{socket.gethostname()}:{os.getpid()}", "forced": bool(force and v.decision == "refused"),
                     "note": note}
            stack = [n for n in pointer.get("stack", []) if n != name] + [name]
            self._commit(lk, {"version": name, "stack": stack, "log": [*pointer.get("log", []), entry]})
            self._set_decision(name, "promoted", promoted=entry["time"])
            return self.show(name)

    def rollback(self, to=None, *, note: str | None = None) -> Version:
        """Move ``current`` back: to the version current before it (``to`` None), or to a named earlier version.

        A named target must have been promoted before (a candidate goes through :meth:`promote`); rollbacks walk
        down the promotion stack (v3 -> v2 -> v1), a target drops the versions above it from the stack.

        Raises:
            RegistryError: nothing to roll back to, an unknown version, or one never promoted.
        """
        with self.lock("rollback") as lk:
            pointer = self.pointer()
            stack, cur = list(pointer.get("stack", [])), pointer.get("version")
            if not cur:
                raise RegistryError(f"{self.root}: nothing is current; promote a version first")
            if to is None:
                if len(stack) < 2:
                    raise RegistryError(f"{self.root}: {cur} has no earlier current version to roll back to")
                target = stack[-2]
                stack = stack[:-1]
            else:
                target = _name(to)
                v = self._version(target, pointer)
                if v.decision != "promoted":
                    raise RegistryError(f"{self.root}: {target} was never current ({v.decision}); use promote")
                if target == cur:
                    return v
                stack = stack[:stack.index(target) + 1] if target in stack else [*stack, target]
            entry = {"action": "rollback", "version": target, "from": cur, "time": now(),
                     "by": f"{socket.gethostname()}:{os.getpid()}", "note": note}
            self._commit(lk, {"version": target, "stack": stack, "log": [*pointer.get("log", []), entry]})
            return self.show(target)

    def _commit(self, lk: RegistryLock, pointer: dict) -> None:
        """Write the pointer: the fence (the lock still ours), then one atomic write."""
        if not lk.held():
            raise RegistryError(f"{lk.path}: this process lost the registry lock (its lease ran out); nothing "
                                "was changed, retry")
        pointer["updated"] = now()
        atomic_write_text(self.root / POINTER, json.dumps(pointer, indent=2) + "\n")
        if not isinstance(self.root, UrlPath):
            _fsync_dir(Path(self.root))


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: fsync the folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _job_text(job_config, run) -> str | None:
    """The resolved job as YAML text: from a dict, a YAML string, a path, or ``config.yaml`` beside final/."""
    if isinstance(job_config, dict):
        import yaml

        return yaml.safe_dump(job_config, sort_keys=False)
    if isinstance(job_config, str) and "\n" in job_config:
        return job_config
    path = as_path(job_config) if job_config is not None else run / "config.yaml"
    if not path.is_file():
        if job_config is not None:
            raise RegistryError(f"{path}: job config not found; pass the run's config.yaml")
        return None
    return path.read_text()


def _metrics(verdict, run) -> dict:
    """A version's metrics: the verdict's (exit code, decision, eval losses, suites) and summary.json's numbers."""
    if isinstance(verdict, dict):
        v = verdict
    else:
        folder = as_path(verdict) if verdict is not None else run
        v = _read_json(folder / "verdict.json") or {}
    summary = _read_json(run / "summary.json") or {}
    out = {"exit_code": v.get("exit_code", summary.get("exit_code")),
           "job_decision": v.get("decision", summary.get("decision")),
           "chosen_step": v.get("chosen_step", summary.get("chosen_step")),
           "steps": v.get("steps", summary.get("steps")),
           **{k: (v.get("metrics") or {}).get(k, summary.get(k)) for k in ("eval_loss_start", "eval_loss")},
           "suites": (v.get("metrics") or {}).get("suites") or {}}
    if not out["suites"]:
        from distrib_ft.runtime.verdict import suite_metrics

        out["suites"] = suite_metrics(_read_json(run / "report.json"))
    for k in ("method", "artifact", "world_size", "tokens_seen"):
        if k in summary:
            out[k] = summary[k]
    return out


def table(versions: list[Version]) -> str:
    """``registry list``'s text: one line per version, ``*`` marks the current one."""
    lines = [f"  {'version':8} {'round':12} {'parent':8} {'decision':10} {'created':21} {'artifact':8} eval_loss"]
    for v in versions:
        m = v.record.get("metrics") or {}
        loss = m.get("eval_loss")
        lines.append(f"{'*' if v.current else ' '} {v.version:8} {str(v.round):12} {str(v.parent or '-'):8} "
                     f"{v.decision:10} {v.created:21} {(v.record.get('artifact') or {}).get('kind', '-'):8} "
                     f"{'-' if loss is None else f'{loss:.4f}'}")
    return "\n".join(lines)


def text(v: Version) -> str:
    """``registry show``'s text: the version's lineage, data, metrics and where its model is."""
    r = v.record
    art = r.get("artifact") or {}
    lines = [f"{v.version}{' (current)' if v.current else ''}: round {v.round}, parent {v.parent or '-'}, "
             f"{v.decision}, created {v.created}",
             f"  model: {v.model} ({art.get('kind')}, {len(art.get('files', {}))} files, {art.get('bytes', 0):,} B)"]
    if r.get("refused"):
        lines.append(f"  refused: {r['refused'].get('reason')}")
    for d in r.get("data_files", []):
        lines.append(f"  data: {d['path']} (sha256 {d['sha256'][:12]})")
    m = r.get("metrics") or {}
    if m.get("eval_loss") is not None:
        start = m.get("eval_loss_start")
        lines.append(f"  eval_loss: {'-' if start is None else f'{start:.4f}'} -> {m['eval_loss']:.4f} "
                     f"(job exit {m.get('exit_code')}, {m.get('job_decision')})")
    for name, su in (m.get("suites") or {}).items():
        lines.append(f"  suite {name}: {su.get('metric')} {su.get('baseline')} -> {su.get('value')} "
                     f"(within budget: {su.get('within_budget')})")
    return "\n".join(lines)
