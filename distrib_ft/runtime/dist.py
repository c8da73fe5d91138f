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


def build_cpu_ops() -> None:
    """Build DeepSpeed's CPU communication op (``deepspeed_shm_comm``) into the project's extensions folder now.

    Every first CPU job would otherwise JIT-compile it while it starts (36 s idle, minutes on a loaded machine);
    ``scripts/setup.sh`` calls this once. ``python -m distrib_ft.runtime.dist`` runs it.
    """
    apply_env(worker_env(threads=os.cpu_count() or 1, use_gpu=False))
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)


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
