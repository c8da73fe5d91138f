"""Resume at another world size: a ZeRO-2/3 checkpoint written by N workers, continued by M.

DeepSpeed's ZeRO checkpoints hold one optimizer partition per rank, and ``engine.load_checkpoint`` refuses
another data-parallel size ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size
is not currently supported"). When a resume finds that the checkpoint's ``job.json`` records another number of
workers, the project converts the checkpoint once into DeepSpeed's Universal Checkpoint (DeepSpeed's tutorial
"Universal Checkpointing", https://www.deepspeed.ai/tutorials/universal-checkpointing/, and
``deepspeed.checkpoint.ds_to_universal`` in 0.19.8): every parameter's fp32 master copy and Adam moments as whole
tensors, which any number of ranks can partition again. The engine then loads it with DeepSpeed's
``checkpoint.load_universal`` switched on for that one load only (a later load of a checkpoint written at the new
size, e.g. the monitor's rollback, is a plain one).

Where: ``checkpoints/step-N/universal/`` beside the original files of step N (which stay as they were), with its
own ``COMPLETE`` written last; rank 0 converts in a temp folder there and renames it, the other ranks wait at a
barrier; a later resume of the same step reuses it; it goes when step N goes (``save_total_limit``). With a URL
``output_dir`` rank 0 makes it in its node-local copy of the step (storage.fetch), uploads it beside the step on the
URL (its COMPLETE last), and the first rank of every other node downloads it. Without ZeRO (stage 0)
the optimizer state is saved whole and DeepSpeed loads it at any world size: no conversion (:func:`needs_universal`).

What stays and what changes (the loss normalisation of distrib_ft/runtime/loop.py makes a step a function of the
global batch only, and distrib_ft/data/batches.py deals each global batch's examples whatever the rank split):

* the global batch G = ``per_device_train_batch_size x gradient_accumulation_steps x num_workers`` is the
  checkpoint's. Keys that give G on the M workers are used as they are (the user's split); otherwise they are
  refitted, with a line: the per-worker share ``G / M`` in micro-batches of the largest size that divides it and is
  not above the job's ``per_device_train_batch_size`` (2 workers x 2 x 1 -> 1 worker x 2 x 2; 1 x 4 x 1 ->
  2 x 2 x 1). A worker count that does not divide G is a one-line error naming the three keys;
* RNG: rank r < N restores rng_rank{r}; a rank the checkpoint did not have is seeded from (training.seed, rank,
  step), and the states of ranks >= M are not used (said in one line);
* streamed data (``data.streaming``) is read per worker from its own part of the stream: refused at another size;
* replay reads each rank's own shards of the buffer: the replay count stays exact, but which old examples come
  next depends on the worker count (said in one line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

UNIVERSAL = "universal"
# training keys the world size may change (refitted to keep the global batch); job.json still records them
GEOMETRY_KEYS = frozenset({"training.per_device_train_batch_size", "training.gradient_accumulation_steps"})
_KEYS = "training.per_device_train_batch_size x training.gradient_accumulation_steps x distributed.num_workers"


def fit_batch(global_batch: int, world: int, micro: int) -> tuple[int, int]:
    """``(per_device_train_batch_size, gradient_accumulation_steps)`` that keep ``global_batch`` on ``world`` workers.

    The micro-batch is the largest divisor of the per-worker share not above ``micro`` (a worker never holds more
    sequences at once than before); the accumulation makes up the rest.

    Raises:
        ValueError: ``world`` does not divide ``global_batch``; one line naming the keys.
    """
    if global_batch % world:
        fits = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
        raise ValueError(f"distributed.num_workers: {world} workers cannot keep the checkpoint's global batch of "
                         f"{global_batch} ({_KEYS}); resume with a number of workers that divides it "
                         f"({', '.join(map(str, fits[:8]))}{', ...' if len(fits) > 8 else ''})")
    share = global_batch // world
    new_micro = max(d for d in range(1, min(micro, share) + 1) if share % d == 0)
    return new_micro, share // new_micro


def _training(owner: dict) -> dict:
    return owner.get("job", {}).get("training", {})


def fitted(saved: dict, owner: dict, path: str | Path) -> tuple[int, int] | None:
    """The batch keys this run must use to continue the checkpoint ``saved`` (its job.json); None: as they are.

    ``owner`` is this run's :meth:`~distrib_ft.job.Job.owner`. Keys whose product with the workers is the
    checkpoint's global batch are used as they are (the user's split); otherwise they are refitted with the job's
    ``per_device_train_batch_size`` as the micro-batch's upper bound (:func:`fit_batch`): after a resume at another
    size, the job file's keys no longer match the newest checkpoint's, and a smaller micro-batch set against an
    out-of-memory error keeps the global batch.

    Raises:
        ValueError: the global batch cannot be kept (one line naming the keys).
    """
    g = saved.get("global_batch")
    if owner["global_batch"] == g:
        return None
    if not isinstance(g, int):
        raise ValueError(f"--resume: {path}: its job.json records no global batch; use another training.output_dir")
    m = owner["world_size"]
    micro = _training(owner).get("per_device_train_batch_size") or owner["global_batch"] // m
    return fit_batch(g, m, micro)


def check_geometry(path: str | Path, saved: dict, owner: dict) -> None:
    """Refuse a resume whose geometry cannot continue checkpoint ``path`` (``saved``: its job.json).

    Another number of workers is fine when the global batch can be kept; streamed data is not.

    Raises:
        ValueError: one line naming the keys.
    """
    fitted(saved, owner, path)
    n = saved.get("world_size")
    if owner["job"].get("data", {}).get("streaming") and n != owner["world_size"]:
        raise ValueError(f"distributed.num_workers: --resume: {path} was written by {n} worker(s) and "
                         "data.streaming is true: each worker reads its own part of the stream, so another number "
                         f"of workers would skip or repeat examples; set distributed.num_workers: {n} to resume")


def read_owner(path: str | Path) -> dict | None:
    """A checkpoint's job.json (:func:`distrib_ft.runtime.checkpoint.save_checkpoint`), or None without one."""
    from distrib_ft.runtime.checkpoint import OWNER

    file = (path if hasattr(path, "is_file") else Path(path)) / OWNER  # a Path or a URL's path object
    return json.loads(file.read_text()) if file.is_file() else None


def fit_resume(job, resume: bool):
    """The job to run: ``job`` itself, or ``job`` with its batch keys refitted to keep the checkpoint's global batch.

    Resuming a checkpoint of another world size, the keys keep the checkpoint's global batch (and a line says so).
    Call after the owner check (:func:`check_geometry`).
    """
    from distrib_ft.runtime import checkpoint as ckpt
    from distrib_ft.runtime import dist

    latest = ckpt.latest_checkpoint(job.config.training.output_dir) if resume else None
    saved = read_owner(latest) if latest is not None else None
    if saved is None:
        return job
    fit = fitted(saved, job.owner(), latest)
    if fit is None:
        return job
    t = job.config.training
    micro, accum = fit
    training = t.model_copy(update={"per_device_train_batch_size": micro, "gradient_accumulation_steps": accum})
    config = job.config.model_copy(update={"training": training})
    from distrib_ft.job import deepspeed_config

    dist.print0(f"resuming {latest.name} of {saved['world_size']} worker(s) on {job.world_size}: global batch "
                f"{saved['global_batch']} kept as per_device_train_batch_size {micro} x gradient_accumulation_steps "
                f"{accum} (the job had {t.per_device_train_batch_size} x {t.gradient_accumulation_steps})")
    return dataclasses.replace(job, config=config, deepspeed=deepspeed_config(config, job.world_size))


def needs_universal(engine, path: str | Path) -> bool:
    """Whether checkpoint ``path`` was written by another number of workers with ZeRO's partitioned optimizer state.

    Without ZeRO (stage 0) the optimizer state is saved whole and DeepSpeed loads it at any world size.
    """
    from distrib_ft.runtime import dist

    saved = read_owner(path)
    n = saved.get("world_size") if saved else None
    return n is not None and n != dist.world_size() and bool(engine.zero_optimization())


def convert(path: str | Path) -> Path:
    """``path/universal``: checkpoint ``path`` as a DeepSpeed universal checkpoint, made once. Collective.

    Rank 0 converts (``ds_to_universal``) in a temp folder inside ``path`` and renames it after its COMPLETE marker
    is written; the others wait. A complete one from an earlier resume is reused; a temp folder of a conversion that
    was killed is removed first.

    Raises:
        RuntimeError: the conversion failed (one line; on every rank).
    """
    from distrib_ft.runtime import dist
    from distrib_ft.runtime.checkpoint import COMPLETE

    path = Path(path)
    target = path / UNIVERSAL
    error = None
    if dist.is_main() and not (target / COMPLETE).exists():
        try:
            _convert(path, target)
        except Exception as e:  # every rank must reach the barrier; the others then see no marker
            error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
    dist.barrier()
    _share(path, target)
    if not (target / COMPLETE).exists():
        raise RuntimeError(f"{path}: the conversion to a DeepSpeed universal checkpoint (to resume on another number "
                           f"of workers) failed{f' ({error})' if error else ' on rank 0'}; resume with the number of "
                           "workers that wrote it")
    return target


def _share(path: Path, target: Path) -> None:
    """With a URL output_dir: rank 0's conversion goes up (COMPLETE last), every other node brings it down. Collective.

    ``path`` is the step's folder in the node-local staging folder; on a local output_dir this does nothing.
    """
    from distrib_ft.runtime import dist, storage
    from distrib_ft.runtime.checkpoint import COMPLETE, atomic_write_text

    out_url = storage.remote(path.parent.parent)
    if out_url is None:
        return
    url = out_url / "checkpoints" / path.name / UNIVERSAL
    if dist.is_main() and (target / COMPLETE).exists() and not (url / COMPLETE).exists():
        storage.upload_tree(target, url)
        atomic_write_text(url / COMPLETE, (target / COMPLETE).read_text())
    dist.barrier()
    if storage.local_rank() == 0 and not (target / COMPLETE).exists() and (url / COMPLETE).exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{UNIVERSAL}.", dir=path))
        try:
            storage.download_tree(url, tmp)
            storage.plain_modes(tmp)  # mkdtemp's 0700 would stay after the rename
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()


def _convert(path: Path, target: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    from distrib_ft.runtime.checkpoint import COMPLETE

    for stale in path.glob(f".{UNIVERSAL}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)  # one without its marker: a half-written one
    tmp = Path(tempfile.mkdtemp(prefix=f".{UNIVERSAL}.", dir=path))
    try:
        # ds_to_universal walks its input folder recursively: give it DeepSpeed's files only
        src = tmp / "src"
        src.mkdir()
        for f in path.glob("*_states.pt"):
            (src / f.name).symlink_to(f.resolve())
        out = tmp / UNIVERSAL
        args = SimpleNamespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                               num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its prints and tqdm bars
                ds_to_universal.main(args)
        except Exception as e:
            raise RuntimeError(f"ds_to_universal: {type(e).__name__}: {e}") from e
        (out / COMPLETE).write_text("universal\n")
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ranks(first: int, last: int) -> str:
    return f"rank {first}" if first == last else f"ranks {first}..{last}"


def load_universal(engine, path: str | Path, *, exclude_frozen: bool) -> dict:
    """Restore checkpoint ``path``, written by another number of workers, into ``engine``; returns the client state.

    Model (trainable weights: a LoRA checkpoint without its frozen base works, the base comes from the model
    loaded at start), optimizer moments and step, LR scheduler, and each rank's RNG (see the module's docstring).
    Collective.
    """
    import torch

    from distrib_ft.runtime import dist
    from distrib_ft.runtime.checkpoint import load_rng_state

    path = Path(path)
    saved = read_owner(path) or {}
    n, m, rank = saved.get("world_size"), dist.world_size(), dist.rank()
    folder = convert(path)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    groups = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in inner.param_groups]
    config, was = engine._config, engine._config.load_universal_checkpoint
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    config.load_universal_checkpoint = True  # DeepSpeed's checkpoint.load_universal, for this load only
    ds_logger.setLevel(logging.ERROR)  # "MPU is not provided, setting tp size to 1" on every rank
    try:
        _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                                 load_module_strict=not exclude_frozen)
    finally:
        config.load_universal_checkpoint = was
        ds_logger.setLevel(level)
    if client_state is None:
        raise RuntimeError(f"{folder}: DeepSpeed could not load this universal checkpoint; delete it to convert "
                           "again, or resume with the number of workers that wrote the checkpoint")
    # ZeRO-3's universal load (load_hp_checkpoint_state_from_checkpoint_dir_stage3) copies the first saved group's
    # hyperparameters into every group; they are the job's, not the state's: set them back (the LR then follows the
    # restored schedule).
    for group, hyper in zip(inner.param_groups, groups):
        group.update(hyper)
    # It also gives every sub-group's state the SAME 'step' tensor, which torch's AdamW increments in place: with
    # more than one group (weight decay / no decay, layer-wise LRs) each optimizer step then advanced it once per
    # sub-group, and Adam's bias correction ran ahead. One tensor per state.
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    step = int(client_state.get("step", 0))
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rank < (n or 0) and rng_file.exists():
        load_rng_state(rng_file)
    else:
        import random

        import numpy as np

        seed = int(saved.get("job", {}).get("training", {}).get("seed", 0))
        state = np.random.SeedSequence([seed, rank, step]).generate_state(2)
        random.seed(int(state[0])), np.random.seed(int(state[1])), torch.manual_seed(int(state[0]))
    fresh = (f"; {_ranks(n or 0, m - 1)} {'starts its' if m - 1 == (n or 0) else 'start their'} RNG from "
             "(training.seed, rank, step)") if m > (n or 0) else ""
    lost = f"; the RNG state of {_ranks(m, n - 1)} is not used" if (n or 0) > m else ""
    dist.print0(f"{path.name}: written by {n} worker(s), loaded on {m} through DeepSpeed's universal checkpoint "
                f"{folder}{fresh}{lost}")
    if saved.get("job", {}).get("replay", {}).get("ratio"):
        dist.print0(f"replay: the buffer's shards are dealt to {m} worker(s) now: the replay count stays exact, the "
                    f"old examples replayed from here on differ from a {n}-worker continuation's")
    return client_state
