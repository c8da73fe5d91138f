"""Where a job's output goes: a local folder, or a URL of any filesystem pyarrow.fs supports (s3://, gs://, hdfs://).

``training.output_dir`` may be a local path (also ``file://...``) or a URL. With a URL, every rank works in a
node-local *staging* folder exactly as with a local path (DeepSpeed writes its checkpoint files there) and this
module copies what the job wrote to the URL; no node needs a shared mount:

- a checkpoint: after DeepSpeed's save, the first rank of each node (LOCAL_RANK 0) uploads every file of its local
  step folder (on separate nodes each holds only its own ranks' files); after a barrier global rank 0 writes
  ``job.json`` and then the ``COMPLETE`` marker, *last*. A step folder on the URL without the marker is an
  interrupted upload and does not count (``checkpoint.complete_checkpoints`` lists only marked ones).
- resume and the monitor's rollback: the first rank of each node downloads the whole chosen checkpoint into its
  staging folder before DeepSpeed loads it (ZeRO loads every rank's optimizer file).
- the end of a job: metrics.jsonl, config.yaml, the report, final/ (or rejected/) with its own ``COMPLETE`` marker
  written last, then summary.json; the driver's verdict.json goes to the URL too.

:class:`UrlPath` is a small pathlib-like view of a URL (``/``, ``name``, ``parent``, ``exists``, ``is_dir``,
``iterdir``, ``read_text``, ``write_text``), so code that checks an output folder reads the same for both kinds
(:func:`as_path`). Filesystems come from ``pyarrow.fs.FileSystem.from_uri``, as Ray Train resolves its own
``storage_path`` (https://docs.ray.io/en/latest/train/user-guides/persistent-storage.html,
https://arrow.apache.org/docs/python/filesystems.html). S3's endpoint and keys are the standard AWS variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); pyarrow >= 15 reads
AWS_ENDPOINT_URL itself (checked on pyarrow 26 against moto's server), older ones get it as ``endpoint_override``.

Writes are atomic: local files through a temp file and a rename; one object on s3:// and gs:// is atomic by
itself; on other filesystems a temp name then a move. A local result gets the mode a plain ``open()`` / ``mkdir``
would give it (:func:`plain_modes`: 0o666 / 0o777 less the umask), not the owner-only one of its temp file
(``tempfile.mkstemp`` 0600, ``mkdtemp`` 0700: https://docs.python.org/3/library/tempfile.html#tempfile.mkstemp),
which a rename keeps.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path, PurePosixPath

COMPLETE = "COMPLETE"
STAGING_MARK = ".distrib-ft-url"  # in a staging folder: the URL it stages
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_ATOMIC_PUT = {"s3", "gs", "gcs"}  # one object is written whole or not at all
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
_lock = threading.Lock()
_filesystems: dict = {}


class StorageError(ValueError):
    """A URL that cannot be opened, or a missing object; one line naming the URL and what to do."""


def is_url(p) -> bool:
    """Whether ``p`` is a remote URL (``scheme://...`` other than ``file://``)."""
    if isinstance(p, UrlPath):
        return True
    m = _URL.match(str(p)) if isinstance(p, str) else None
    return bool(m) and m.group(1).lower() != "file"


def as_path(p) -> Path | UrlPath:
    """A :class:`UrlPath` for a remote URL; a local ``Path`` otherwise (``file://`` URLs and ``~`` resolved)."""
    if isinstance(p, (UrlPath, Path)):
        return p
    s = str(p)
    if is_url(s):
        return UrlPath(s)
    if s.lower().startswith("file://"):
        return Path(s[len("file://"):])
    return Path(s).expanduser()


# ------------------------------------------------------------------------------------------- filesystems


def filesystem(url: str):
    """(pyarrow filesystem, path inside it) of a remote URL; the filesystem is cached per scheme, host and env."""
    import pyarrow
    import pyarrow.fs as pafs

    m = _URL.match(url)
    scheme, rest = m.group(1).lower(), m.group(2)
    host = rest.split("/", 1)[0]
    env = tuple(os.environ.get(k) for k in AWS_VARIABLES)
    key = (scheme, host, env)
    with _lock:
        fs = _filesystems.get(key)
    if fs is None:
        try:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if scheme == "s3" and endpoint and int(pyarrow.__version__.split(".")[0]) < 15:
                region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
                scheme_, _, hostport = endpoint.partition("://")
                fs = pafs.S3FileSystem(endpoint_override=hostport or scheme_, scheme=scheme_ if hostport else "https",
                                       region=region)
            else:
                fs, _ = pafs.FileSystem.from_uri(url)
        except (pyarrow.ArrowException, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise StorageError(f"{url}: cannot open this URL ({first}); check the URL and, for s3://, the AWS "
                               "variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                               "AWS_DEFAULT_REGION)") from None
        with _lock:
            _filesystems[key] = fs
    path = rest if scheme in ("s3", "gs", "gcs") else _inner_path(scheme, rest)
    return fs, path.rstrip("/")


def _inner_path(scheme: str, rest: str) -> str:
    """The path inside a filesystem whose URL names a host (hdfs://host:port/path -> /path)."""
    _, _, path = rest.partition("/")
    return "/" + path


class UrlPath:
    """A pathlib-like view of a remote URL (the operations this project needs), over pyarrow.fs."""

    def __init__(self, url: str):
        m = _URL.match(str(url))
        if not m:
            raise ValueError(f"{url}: not a URL (scheme://...)")
        self.scheme, rest = m.group(1).lower(), m.group(2).rstrip("/")
        self.url = f"{self.scheme}://{rest}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, part) -> UrlPath:
        return UrlPath(self.url + "/" + str(part).strip("/"))

    @property
    def name(self) -> str:
        return PurePosixPath(self.url.split("://", 1)[1]).name

    @property
    def parent(self) -> UrlPath:
        rest = self.url.split("://", 1)[1]
        return UrlPath(f"{self.scheme}://{rest.rsplit('/', 1)[0]}") if "/" in rest else self

    def relative_to(self, other: UrlPath) -> str:
        if not (self.url + "/").startswith(other.url + "/"):
            raise ValueError(f"{self} is not under {other}")
        return self.url[len(other.url):].lstrip("/")

    def _fs(self):
        return filesystem(self.url)

    def _info(self):
        fs, path = self._fs()
        return fs.get_file_info(path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def iterdir(self) -> list[UrlPath]:
        import pyarrow.fs as pafs

        fs, path = self._fs()
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return [self / PurePosixPath(i.path).name for i in infos]

    def files(self) -> dict[str, int]:
        """Every file under this folder: ``{relative path: size}``."""
        import pyarrow.fs as pafs

        fs, path = self._fs()
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return {i.path[len(path):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}

    def read_bytes(self) -> bytes:
        fs, path = self._fs()
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: no such object") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        fs, path = self._fs()
        if self.scheme in _ATOMIC_PUT:
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{path.rsplit('/', 1)[0]}/.{self.name}.{os.getpid()}.tmp"
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        fs, path = self._fs()
        fs.create_dir(path, recursive=True)

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self._fs()
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Delete this folder and everything under it (the marker first, so it stops counting at once)."""
        (self / COMPLETE).unlink(missing_ok=True)
        fs, path = self._fs()
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            pass


def fsspec_filesystem(url: str):
    """(fsspec filesystem, path) of a URL through pyarrow.fs (fsspec's ArrowFSWrapper).

    For fsspec users (the replay buffer) when the scheme's own fsspec backend (s3fs, gcsfs) is not installed.
    """
    from fsspec.implementations.arrow import ArrowFSWrapper

    fs, path = filesystem(url)
    return ArrowFSWrapper(fs), path


def local_input(path: str) -> str:
    """A data file (or saved-dataset folder) on a URL, downloaded once into ``<cache>/inputs/``; else ``path``.

    The cache entry is named by the URL, the endpoint, the object's size and time, so a changed object is
    downloaded again. A missing URL is returned as it is (the caller's "file not found" names it).
    """
    import pyarrow.fs as pafs

    from distrib_ft.runtime.dist import cache_dir

    if not is_url(path):
        return path
    url = UrlPath(path)
    info = url._info()
    if info.type == pafs.FileType.NotFound:
        return path
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    stamp = f"{url}\n{endpoint}\n{info.size}\n{info.mtime_ns}"
    target = cache_dir() / "inputs" / hashlib.sha256(stamp.encode()).hexdigest()[:16] / url.name
    if info.type == pafs.FileType.Directory:
        download_tree(url, target)
    elif not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        fs, inner = url._fs()
        with fs.open_input_stream(inner) as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out, 8 << 20)
        os.replace(tmp, target)
    return str(target)


# -------------------------------------------------------------------------------------- staging folders


def local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK; 0 outside a distributed run)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def staging_dir(url: str) -> Path:
    """The node-local folder where a job with output_dir ``url`` works: ``<cache>/staging/<name>-<hash>``.

    The hash covers the URL and the S3 endpoint, so two servers' ``s3://b/run`` never share a folder.
    """
    from distrib_ft.runtime.dist import cache_dir

    url = str(url).rstrip("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    digest = hashlib.sha256(f"{url}\n{endpoint}".encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1])[-48:].strip("_") or "run"
    folder = Path(os.environ.get("DISTRIB_FT_STAGING") or cache_dir() / "staging") / f"{name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / STAGING_MARK
    if not mark.is_file():
        atomic_write_text(mark, url + "\n")
    return folder


def remote(output_dir) -> UrlPath | None:
    """The URL a job's output goes to: ``output_dir`` itself when it is one, or the URL a staging folder stages."""
    if isinstance(output_dir, UrlPath) or is_url(output_dir):
        return as_path(output_dir)
    mark = as_path(output_dir) / STAGING_MARK
    if mark.is_file():
        return UrlPath(mark.read_text().strip())
    return None


def local(output_dir) -> Path:
    """The local folder a job writes in: the staging folder of a URL, else the folder itself."""
    if isinstance(output_dir, UrlPath) or is_url(output_dir):
        return staging_dir(str(output_dir))
    return as_path(output_dir)


def root(output_dir) -> Path | UrlPath:
    """Where a job's results are read from: the URL when there is one, else the local folder."""
    return remote(output_dir) or as_path(output_dir)


def public(path) -> str:
    """``path`` as the user knows it: a file in a staging folder becomes its URL; others stay as they are."""
    p = as_path(path)
    if isinstance(p, UrlPath):
        return str(p)
    for folder in (p, *p.parents):
        url = remote(folder) if (folder / STAGING_MARK).is_file() else None
        if url is not None:
            rel = p.relative_to(folder)
            return str(url / str(rel)) if str(rel) != "." else str(url)
    return str(p)


def _read_umask_once() -> int:
    """The umask at import, set back at once; the value held meanwhile is the private 0o077, never a wider one."""
    old = os.umask(0o077)
    os.umask(old)
    return old


_UMASK_AT_IMPORT = _read_umask_once()


def umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status ``Umask:``; else the import's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_IMPORT


def plain_modes(path, *, tree: bool = False) -> None:
    """Give ``path`` (with ``tree``: everything under it too) the mode a plain ``open()`` / ``mkdir`` would have.

    0o777 & ~umask for folders and files with an owner x bit, 0o666 & ~umask for the others; symlinks are left
    alone. For results made through a temp file or folder before their rename: ``tempfile.mkstemp`` makes files
    0600, ``mkdtemp`` / ``TemporaryDirectory`` folders 0700, and safetensors' ``save_file`` files 0600 (checked with
    safetensors 0.8 under umask 0022), so a deploy service or another user could not read a model otherwise.
    """
    mask = umask()
    path = Path(path)
    for p in [path, *(path.rglob("*") if tree and path.is_dir() else ())]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        os.chmod(p, (0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666) & ~mask)


def atomic_write_text(path, text: str) -> None:
    """Write a text file so that it is never half-written (UTF-8; see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path, data: bytes) -> None:
    """Write a file so that it is never half-written.

    A URL as one object (UrlPath.write_bytes: one PUT); a local file through a temp file in the same folder, fsync,
    then a rename. Imports no torch (the CLI and the registry use it).
    """
    if isinstance(path, UrlPath) or is_url(path):
        as_path(path).write_bytes(data)
        return
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would stay after the rename
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------- copying


def upload_tree(local_dir: Path, dest: UrlPath, *, skip: tuple[str, ...] = (COMPLETE,), threads: int = 4) -> int:
    """Copy every file under ``local_dir`` to ``dest`` (same relative paths), but ``skip`` names. Returns the count.

    Files whose name starts with ``.`` (temp files, the staging mark) are not copied.
    """
    local_dir = Path(local_dir)
    files = [p for p in sorted(local_dir.rglob("*"))
             if p.is_file() and p.name not in skip and not p.name.startswith(".")]
    fs, base = dest._fs()
    if dest.scheme not in _ATOMIC_PUT:  # object stores have no folders to make
        for folder in {str(PurePosixPath(base, p.relative_to(local_dir).parent.as_posix())) for p in files}:
            fs.create_dir(folder, recursive=True)

    def put(p: Path) -> None:
        with open(p, "rb") as f, fs.open_output_stream(f"{base}/{p.relative_to(local_dir).as_posix()}") as out:
            shutil.copyfileobj(f, out, 8 << 20)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, files))
    return len(files)


def download_tree(src: UrlPath, local_dir: Path, *, threads: int = 4) -> int:
    """Make ``local_dir`` hold every file under ``src``: download those missing or of another size. Returns the count.

    Each file goes to a temp name, then is renamed: a killed download never leaves a short file.
    """
    local_dir = Path(local_dir)
    wanted = src.files()
    todo = [rel for rel, size in wanted.items()
            if not (local_dir / rel).is_file() or (local_dir / rel).stat().st_size != size]
    fs, base = src._fs()

    def get(rel: str) -> None:
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        with fs.open_input_stream(f"{base}/{rel}") as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out, 8 << 20)
        os.replace(tmp, target)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, todo))
    return len(todo)


def fetch(path) -> Path:
    """The local copy of ``path`` (a checkpoint folder), downloaded from its URL by each node's first rank.

    ``path`` is a :class:`UrlPath` or a folder in a staging folder; a plain local folder is returned as it is.
    Collective when the job's output is a URL: every rank calls it (a barrier follows the download).
    """
    from distrib_ft.runtime import dist

    p = as_path(path)
    if isinstance(p, UrlPath):
        url, out_url = p, p.parent.parent
        target = staging_dir(str(out_url)) / p.relative_to(out_url)
    else:
        out_dir = p.parent.parent
        out_url = remote(out_dir)
        if out_url is None:
            return p
        url, target = out_url / str(p.relative_to(out_dir)), p
    if local_rank() == 0:
        download_tree(url, target)
    dist.barrier()
    return target


def publish(output_dir, names: list[str], marked: tuple[str, ...] = ("final", "rejected")) -> None:
    """Upload files and folders of a job's staging folder to its URL (a no-op for a local output_dir).

    ``names`` in order; a folder replaces the URL's copy (deleted first, marker first); those in ``marked`` get a
    ``COMPLETE`` marker after their files. Missing names are skipped.
    """
    url = remote(output_dir)
    if url is None:
        return
    staging = local(output_dir)
    for name in names:
        src = staging / name
        if src.is_dir():
            (url / name).rmtree()
            upload_tree(src, url / name)
            if name in marked:
                (url / name / COMPLETE).write_text("complete\n")
        elif src.is_file():
            with open(src, "rb") as f:
                (url / name).write_bytes(f.read())


_synced: dict[str, tuple[int, int]] = {}  # staging file -> (size, mtime_ns) last uploaded by this process


def sync_files(output_dir) -> None:
    """Upload the files at the top of the staging folder that changed since this process last did (rank 0).

    With each checkpoint: metrics.jsonl, config.yaml and the defences' state files (e.g. EWC's Fisher), which a
    resume on another node takes back (:func:`prepare`). A no-op for a local output_dir.
    """
    url = remote(output_dir)
    if url is None:
        return
    for p in sorted(local(output_dir).iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        st = p.stat()
        if _synced.get(str(p)) != (st.st_size, st.st_mtime_ns):
            publish(output_dir, [p.name])
            _synced[str(p)] = (st.st_size, st.st_mtime_ns)


def publish_all(output_dir) -> None:
    """Upload the end of a job to its URL (rank 0; a no-op for a local output_dir).

    Everything in the staging folder but the checkpoints (already there), then final/ (or rejected/) with its
    marker, then summary.json last.
    """
    if remote(output_dir) is None:
        return
    last = ("final", "rejected", "summary.json")
    names = sorted(p.name for p in local(output_dir).iterdir()
                   if not p.name.startswith(".") and p.name != "checkpoints" and p.name not in last)
    publish(output_dir, [*names, *last])


def artifact_exists(path) -> bool:
    """Whether a final/ (or rejected/) folder is there: on a URL, only once its ``COMPLETE`` marker is."""
    p = as_path(path)
    return (p / COMPLETE).exists() if isinstance(p, UrlPath) else p.exists()


def prepare(output_dir, resume: bool) -> None:
    """Make each node's staging folder ready for a job with a URL output_dir (collective; a no-op otherwise).

    The first rank of each node empties it of another run's files: a fresh run starts from an empty folder; a
    resumed one keeps the step folders complete on the URL, and takes the files at the top of the URL (metrics.jsonl,
    the defences' state files) back.
    """
    from distrib_ft.runtime import dist

    url = remote(output_dir)
    if url is None:
        return
    if local_rank() == 0:
        keep = set()
        if resume and (url / "checkpoints").is_dir():
            keep = {p.name for p in (url / "checkpoints").iterdir() if (p / COMPLETE).exists()}
        _empty_staging(output_dir, resume, keep)
        if resume:  # metrics.jsonl and the defences' state files, as the last checkpoint left them
            for p in url.iterdir() if url.is_dir() else []:
                if p.name != "verdict.json" and p.is_file():
                    pull_file(output_dir, p.name)
    dist.barrier()


def _empty_staging(output_dir, resume: bool, keep: set[str]) -> None:
    staging = local(output_dir)
    for p in staging.iterdir():
        if p.name == STAGING_MARK:
            continue
        if resume and p.name == "checkpoints":
            for step in p.iterdir():
                if step.name not in keep:
                    shutil.rmtree(step, ignore_errors=True)
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def pull_file(output_dir, name: str) -> bool:
    """Download the URL's file ``name`` into the staging folder (when there is a URL and the file). Returns whether."""
    url = remote(output_dir)
    if url is None or not (url / name).is_file():
        return False
    target = local(output_dir) / name
    tmp = target.with_name(f".{name}.{os.getpid()}.part")
    tmp.write_bytes((url / name).read_bytes())
    os.replace(tmp, target)
    return True


# ----------------------------------------------------------------------------------------- shared check


def check_shared(output_dir) -> None:
    """Refuse a local output_dir that the ranks do not all see (several nodes, no shared mount). Collective.

    Rank 0 writes a probe file; after a barrier every rank looks for it. A URL output_dir needs no check.

    Raises:
        ConfigError: ``training.output_dir: /x is not shared between the nodes of ranks 0 and N; ...``.
    """
    from distrib_ft.runtime import dist

    if dist.world_size() < 2 or remote(output_dir) is not None:
        return
    out = as_path(output_dir)
    token = dist.broadcast_object(f"{os.getpid()}-{os.urandom(6).hex()}" if dist.is_main() else None)
    probe = out / f".distrib-ft-probe-{token}"
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(probe, token)
    dist.barrier()
    seen = dist.all_gather_object(probe.is_file())
    dist.barrier()
    if dist.is_main():
        probe.unlink(missing_ok=True)
    missing = [r for r, ok in enumerate(seen) if not ok]
    if missing:
        from distrib_ft.schema import ConfigError

        raise ConfigError(f"training.output_dir: {out} is not shared between the nodes of ranks 0 and {missing[0]}; "
                         "use a shared mount or an s3:// (gs://, hdfs://) URL")


def check_writable(output_dir) -> None:
    """Write and delete a probe object under a URL output_dir, so a missing bucket or a bad key is found first.

    Raises:
        StorageError: ``training.output_dir: URL cannot be written (the store's reason); ...`` (one line).
    """
    url = remote(output_dir)
    if url is None:
        return
    probe = url / f".distrib-ft-probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        probe.write_text("probe\n")
        probe.unlink(missing_ok=True)
    except OSError as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        reason = re.sub(r" \(Request ID: [^)]*\)", "", reason)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        raise StorageError(f"training.output_dir: {url} cannot be written ({reason}"
                           f"{f'; endpoint {endpoint}' if endpoint else ''}); create the bucket, or check the URL and "
                           "the AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None


def forward_env(output_dir) -> dict[str, str]:
    """The AWS variables set on the driver, for the workers' environment when output_dir is a URL."""
    if not is_url(output_dir):
        return {}
    return {k: os.environ[k] for k in AWS_VARIABLES if os.environ.get(k)}
