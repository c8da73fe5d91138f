"""DeepSpeed's CPU Adam op (``cpu_adam``), which ZeRO with ``offload_optimizer: {device: cpu}`` steps with.

DeepSpeed JIT-compiles its ops with torch's cpp_extension the first time they are loaded (DeepSpeed docs, "Installing
DeepSpeed": ops are built just-in-time unless ``DS_BUILD_OPS=1`` at install time; ZeRO-Offload docs: the offloaded
optimizer is ``DeepSpeedCPUAdam``). Unbuilt, the first offload job compiles it while its ranks wait; here it is built
once, by ``scripts/setup.sh`` (``python -m distrib_ft.runtime.offload_ops``) or by the first job, into the project's
TORCH_EXTENSIONS_DIR (:func:`distrib_ft.runtime.dist.extensions_dir`), with the same care as the CPU communication op
(:func:`distrib_ft.runtime.dist.ensure_cpu_ops`): one builder at a time under an ``fcntl`` lock, a killed build's
stale torch ``lock`` removed, a ``.so`` cut short rebuilt.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

CPU_ADAM = "cpu_adam"  # the op's folder and .so name (DeepSpeed's CPUAdamBuilder)
CPU_ADAM_NOTICE = "building DeepSpeed's CPU Adam op once (ZeRO offload_optimizer; {}) into {}"
# Measured: the build of cpu_adam into an empty folder on this project's 2-core machine took 678 s wall at load 12-22;
# its two compile units took 62 CPU-s each (they run in parallel) and the link a few, so ~1 min on 2 idle cores (see
# docs/benchmarks.md, "ZeRO-3 with CPU offload: memory per worker").
CPU_ADAM_BUILD_ESTIMATE = "~1 min on 2 idle cores, ~11 min on a loaded machine"


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether a (filled) DeepSpeed config steps its optimizer on the CPU (ZeRO ``offload_optimizer.device: cpu``)."""
    zero = ds_config.get("zero_optimization") or {}
    return str((zero.get("offload_optimizer") or {}).get("device", "none")).lower() == "cpu"


def ensure_cpu_adam(say=None) -> Path | None:
    """Load DeepSpeed's CPU Adam op, building it first when needed; never wait on a dead build's lock.

    The same procedure as :func:`distrib_ft.runtime.dist.ensure_cpu_ops` for ``deepspeed_shm_comm``: an ``fcntl``
    lock of ours (``.cpu_adam.build-lock`` beside the op's folder; the kernel drops it when its holder dies) lets one
    process build while the others wait with a line; under it, torch's ``lock`` that no live process holds is a killed
    build's and is removed; a ``.so`` cut short is removed before loading; a failed build is retried once from its
    sources. DeepSpeed keeps the loaded op, so ``DeepSpeedCPUAdam`` does not build it again.

    Args:
        say: where lines go (default: stderr).

    Returns:
        The op's folder, or None when this DeepSpeed has no compatible CPU Adam op.

    Raises:
        RuntimeError: the op failed to build twice (the compiler's message is in the exception).
    """
    from distrib_ft.runtime.dist import extensions_dir, load_op

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder.builder import OpBuilder

    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return None
    build_dir = extensions_dir() / builder.name
    if builder.name not in OpBuilder._loaded_ops:
        load_op(builder, CPU_ADAM_NOTICE.format(CPU_ADAM_BUILD_ESTIMATE, build_dir), say)
    return build_dir


def build_cpu_adam() -> None:
    """Build the CPU Adam op now (``scripts/setup.sh``); prints where it is and how long the build took."""
    from distrib_ft.runtime.dist import apply_env, worker_env

    apply_env(worker_env(threads=os.cpu_count() or 1, use_gpu=False))
    start = time.perf_counter()
    where = ensure_cpu_adam()
    if where is None:
        print("distrib-ft: this DeepSpeed has no CPU Adam op for this machine; ZeRO offload jobs cannot run",
              flush=True)
        raise SystemExit(1)
    print(f"distrib-ft: DeepSpeed's CPU Adam op is ready in {where} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    build_cpu_adam()
