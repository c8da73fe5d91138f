"""Process-group helpers: one entry point that works in-process, under torchrun and in Ray workers."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def cache_dir() -> Path:
    """The project's cache: converted models, DeepSpeed's JIT-compiled ops."""
    return Path(os.environ.get("DISTRIB_FT_CACHE", Path.home() / ".cache" / "distrib-ft"))


def worker_env(threads: int, use_gpu: bool) -> dict[str, str]:
    """Environment for a worker process: set before torch and DeepSpeed are imported there.

    A private TORCH_EXTENSIONS_DIR keeps DeepSpeed's JIT-compiled ops (``deepspeed_shm_comm``) apart
    from other installs, which would otherwise rebuild each other's; one OMP thread pool per worker
    sized to its CPU share (without it 2 processes on 2 cores ran 28x slower).
    """
    import platform

    env = {
        "OMP_NUM_THREADS": str(threads),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # our rank-0 lines, once (the patch logs each print again)
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": str(cache_dir() / "torch_extensions" / f"py{platform.python_version()}"),
    }
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's JIT-built CPU communication op (ShareMemCommBuilder)
BUILD_NOTICE = "building DeepSpeed's CPU communication op once (~1-2 min on 2 cores) into {}"


def extensions_dir() -> Path:
    """Where torch builds JIT extensions for this process: TORCH_EXTENSIONS_DIR, set (if unset) to the project's."""
    import platform

    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          str(cache_dir() / "torch_extensions" / f"py{platform.python_version()}"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


# the processes of a build that run in its folder (a shell that merely sits there does not count)
_BUILDERS = {"ninja", "c++", "g++", "gcc", "cc", "clang", "clang++", "cc1plus", "cc1", "as", "ld", "collect2",
             "ld.bfd", "ld.gold", "ld.lld"}


def lock_holders(lock: Path) -> list[int]:
    """PIDs of live processes that hold ``lock`` open or run in its folder (Linux /proc; others' are skipped).

    torch's FileBaton keeps its ``lock`` file open from creation to release, and runs ninja (and ninja the
    compiler) in the build folder: a build in progress shows up either way (of the processes in the folder, only
    build tools count).
    """
    lock = Path(lock).resolve()
    target, folder, holders = str(lock), str(lock.parent), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if os.readlink(f"/proc/{pid}/cwd") == folder and Path(f"/proc/{pid}/comm").read_text().strip() in _BUILDERS:
                holders.append(int(pid))
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    holders.append(int(pid))
                    break
            except OSError:
                continue
    return holders


def clear_stale_lock(build_dir: Path, say=print) -> bool:
    """Remove torch's ``lock`` in ``build_dir`` when no live process holds it (a build that was killed).

    Call with the project's build lock held (:func:`ensure_cpu_ops`): then no build of ours is running, and a
    ``lock`` no live process holds open can only be a dead builder's. A half-built ``.so`` of that build is
    removed too, so that torch relinks it. Waits while a live (foreign) process holds the lock.

    Returns:
        True when a stale lock was removed.
    """
    import time

    lock, waited = build_dir / "lock", False
    while lock.exists():
        holders = lock_holders(lock) if Path("/proc/self/fd").is_dir() else []
        if not holders:
            age = time.time() - lock.stat().st_mtime if lock.exists() else 0.0
            lock.unlink(missing_ok=True)
            (build_dir / f"{build_dir.name}.so").unlink(missing_ok=True)
            say(f"distrib-ft: removed a stale build lock {lock} ({age:.0f} s old, no live process holds it: a build "
                "was killed); rebuilding")
            return True
        if not waited:
            say(f"distrib-ft: waiting for process {holders[0]}, which is building {build_dir.name} in {build_dir}")
            waited = True
        time.sleep(1.0)
    return False


def elf_cut_short(path: Path) -> str | None:
    """Why the shared object ``path`` is incomplete (a build killed while linking), or None when it looks whole.

    Loading a cut-short ``.so`` is no ImportError: the loader maps pages past the end of the file and the process
    dies of SIGBUS. So the file is checked first: ELF magic, and every program header's bytes and the section
    header table (which linkers write last) inside the file.
    """
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF only (the platforms we build on)
            return f"not a 64-bit ELF file ({size} bytes)"
        end = "<" if head[5] == 1 else ">"
        phoff, shoff = struct.unpack_from(end + "QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 0x36)
        need = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
        if need <= size:
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                offset, filesz = struct.unpack_from(end + "Q", table, i * phentsize + 8)[0], \
                    struct.unpack_from(end + "Q", table, i * phentsize + 32)[0]
                need = max(need, offset + filesz)
    return f"{size} of at least {need} bytes" if need > size else None


def _same_ninja() -> None:
    """Put this venv's ``ninja`` (the PyPI package's) first on PATH, when there is one and PATH finds another.

    torch runs the first ``ninja`` on PATH. Two ninja versions hash a command differently in ``.ninja_log`` (1.13
    changed the hash), so jobs that found the system's 1.11 and jobs that found the venv's 1.13 each saw "command
    line changed" and recompiled the op (2 min on a loaded 2-core machine) at every start, in turn.
    """
    import shutil

    venv_ninja = Path(sys.executable).parent / "ninja"
    if venv_ninja.is_file() and shutil.which("ninja") != str(venv_ninja):
        os.environ["PATH"] = f"{venv_ninja.parent}{os.pathsep}{os.environ.get('PATH', '')}"


def ensure_cpu_ops(say=None) -> None:
    """Load (building it first when needed) DeepSpeed's CPU communication op; never wait on a dead build's lock.

    torch's JIT build guards each extension folder with a ``lock`` file that holds no PID; a build killed
    midway leaves it behind and every later load waits forever (torch's ``FileBaton.wait``). Here the build
    runs under a ``fcntl`` lock of our own (``.<op>.build-lock`` beside the folder; the kernel drops it
    when its holder dies), so a torch ``lock`` found while holding ours, with no live process holding it open,
    is a dead builder's: it is removed with a line, and the op rebuilt. A build that is needed is announced
    before it starts. A ``.so`` cut short (checked as ELF before loading) or that fails to load is removed
    and rebuilt once; a failed build is
    started again from the sources once. DeepSpeed keeps
    the loaded op, so its own load in ``init_distributed`` does not build again. No-op with CUDA.

    Args:
        say: where lines go (default: stderr).
    """
    if torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        return
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    root = extensions_dir()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder.builder import OpBuilder

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) \
            or builder.name in OpBuilder._loaded_ops:
        return
    load_op(builder, BUILD_NOTICE.format(root / builder.name), say)


def load_op(builder, notice: str, say) -> None:
    """Load DeepSpeed op ``builder`` from the project's extensions folder, building it first when needed.

    The build is announced with ``notice`` and runs under the lock and the checks :func:`ensure_cpu_ops` describes:
    any number of processes may call it at once; one builds, the others wait (a line after 3 s).
    """
    import fcntl
    import time

    root = extensions_dir()
    build_dir = root / builder.name
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(root / f".{builder.name}.build-lock", "a+") as guard:
        since = time.time()
        while True:  # another process of ours loads or builds it: wait (a line if that takes a while)
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if since is not None and time.time() - since > 3:
                    guard.seek(0)
                    say(f"distrib-ft: waiting for {guard.read().strip() or 'another process'} to load or build "
                        f"{builder.name} in {build_dir}")
                    since = None
                time.sleep(0.2)
        guard.seek(0)
        guard.truncate()
        guard.write(f"process {os.getpid()}")
        guard.flush()
        clear_stale_lock(build_dir, say)
        _same_ninja()
        so = build_dir / f"{builder.name}.so"
        short = elf_cut_short(so) if so.exists() else None
        if short:  # ninja would see it as up to date, and loading it would kill this process (SIGBUS)
            say(f"distrib-ft: {so} was cut short ({short}): a build was killed while linking; rebuilding it")
            so.unlink(missing_ok=True)
        if not so.exists():
            say(f"distrib-ft: {notice}")
        try:
            builder.load(verbose=False)
        except (ImportError, RuntimeError) as e:
            if isinstance(e, ImportError):  # a .so that was cut short: ninja saw it as up to date
                say(f"distrib-ft: {so} does not load ({str(e).splitlines()[0]}); rebuilding it")
                so.unlink(missing_ok=True)
            else:  # the build failed: start it again from nothing (a killed build's objects included)
                say(f"distrib-ft: building {builder.name} failed ({str(e).splitlines()[0]}); rebuilding it from "
                    "its sources")
                for f in build_dir.iterdir():
                    if f.is_file() and f.name != "lock":
                        f.unlink(missing_ok=True)
            from torch.utils.cpp_extension import JIT_EXTENSION_VERSIONER

            JIT_EXTENSION_VERSIONER.entries.pop(builder.name, None)  # else torch skips the build in this process
            builder.load(verbose=False)


def build_cpu_ops() -> None:
    """Build DeepSpeed's CPU communication op (``deepspeed_shm_comm``) into the project's extensions folder now.

    Every first CPU job would otherwise JIT-compile it while it starts (36 s idle, minutes on a loaded machine);
    ``scripts/setup.sh`` calls this once. ``python -m distrib_ft.runtime.dist`` runs it and prints one line:
    where the op is. A stale lock of a killed build is removed (see :func:`ensure_cpu_ops`).
    """
    apply_env(worker_env(threads=os.cpu_count() or 1, use_gpu=False))
    ensure_cpu_ops()
    print(f"distrib-ft: DeepSpeed's CPU communication op is ready in {extensions_dir() / SHM_OP}", flush=True)


def apply_env(env: dict[str, str]) -> None:
    """Set each variable of ``env`` in ``os.environ`` unless it is already set (set values win)."""
    for k, v in env.items():
        os.environ.setdefault(k, v)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; the socket is closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_third_party() -> None:
    """Silence deprecation chatter that the stack prints at every start (not ours to fix).

    Also the progress bars of loading steps on ranks other than 0.
    """
    import logging
    import warnings

    for module in ("torch.distributed", "transformers.modeling_utils", "deepspeed", "peft"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if rank() != 0:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def init(backend: str = "auto") -> None:
    """Initialise torch.distributed through DeepSpeed, unless a launcher (Ray Train) already did.

    In-process with no launcher variables, this is a world of one on gloo/nccl.
    """
    import deepspeed

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":  # DeepSpeed loads its CPU op in init_distributed: built here, past any stale lock
        ensure_cpu_ops(say=lambda line: print(f"[rank {os.environ.get('RANK', '0')}] {line}", file=sys.stderr,
                                                flush=True))
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    quiet_third_party()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank() -> int:
    """This process's rank; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes files and prints)."""
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (to stderr, so that stdout stays clean for results)."""
    if is_main():
        print(*args, file=sys.stderr, flush=True, **kwargs)


def barrier() -> None:
    """Wait for every rank; a no-op when torch.distributed is not initialised."""
    if dist.is_initialized():
        dist.barrier()


def main_first(fn):
    """Run ``fn`` on rank 0 first (it prepares caches, e.g. datasets' Arrow files), then on the others."""
    result = None
    for turn in (0, 1):
        if (rank() == 0) == (turn == 0):
            result = fn()
        barrier()
    return result


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum a few scalars over all ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def device() -> torch.device:
    """This rank's device: the current CUDA device when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (pickled; for modest sizes)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_batches(n: int, batch_size: int):
    """This rank's share of ``n`` items (every ``world``-th) in batches: yields ``(idx, run)``.

    Every rank yields the same number of batches, because under ZeRO-3 each forward gathers parameters from all
    ranks; a rank whose share has run out gets ``idx=[]`` and ``run`` = a repeat of its last item, to
    compute and discard.
    """
    r, world = rank(), world_size()
    mine = list(range(r, n, world))
    for b in range(math.ceil(math.ceil(n / world) / batch_size)):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        yield idx, idx or mine[-1:] or [0]


def gather_shares(local: dict, n: int) -> list:
    """Every rank's ``{index: result}`` for its share of ``n`` items, merged in index order on every rank."""
    merged: dict = {}
    for part in all_gather_object(local):
        merged.update(part)
    return [merged[i] for i in range(n)]


if __name__ == "__main__":
    build_cpu_ops()
