"""Checkpoints for exact resume, and the final model in Hugging Face / peft format.

Layout under ``output_dir``::

    checkpoints/step-N/       DeepSpeed checkpoint (model, optimizer, scheduler; frozen weights
                              excluded for LoRA), rng_rank{R}.safetensors per rank (no pickle), and COMPLETE once every
                              rank has written; resume only considers complete checkpoints.
    final/                    peft adapter (adapter_config.json, adapter_model.safetensors) or the
                              full model (config.json, model.safetensors), plus the tokenizer.

The loop's own state (step, data position) travels in DeepSpeed's ``client_state``.

``output_dir`` may be a URL (s3://, gs://, hdfs://): the files are written in a node-local staging folder and
copied there, the COMPLETE marker last (distrib_ft/runtime/storage.py). Every function here takes the URL, or
the staging folder, or a local folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distrib_ft.methods import exports_trainable_only
from distrib_ft.runtime import dist, storage
from distrib_ft.schema import flatten

atomic_write_text = storage.atomic_write_text  # temp file + rename locally, one object on a URL
COMPLETE = "COMPLETE"
OWNER = "job.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_rng_state(path: str | Path) -> None:
    """Write this process's RNG states to ``path`` in safetensors (no pickle).

    Torch's CPU (and CUDA) state and NumPy's key are tensors; Python's state and NumPy's other fields JSON metadata.
    """
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(key.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    meta = {"python": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)])}
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    storage.plain_modes(tmp)  # safetensors writes 0600
    os.replace(tmp, path)


def load_rng_state(path: str | Path) -> None:
    """Restore the RNG states :func:`save_rng_state` wrote; CUDA's only when present and CUDA is available."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir/checkpoints, oldest first.

    For a URL output_dir (or its staging folder) those on the URL, as ``storage.UrlPath``: only a step folder
    whose COMPLETE marker (written last) arrived counts.
    """
    root = storage.root(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE).exists()]
    return [p for _, p in sorted(found)]


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Step folders under output_dir/checkpoints without a COMPLETE marker (an interrupted save or upload)."""
    root = storage.root(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and not (p / COMPLETE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path, say=None) -> Path | None:
    """The newest complete checkpoint under output_dir/checkpoints, or None when there is none.

    ``say`` (e.g. ``dist.print0``): told of each newer step folder skipped because it has no COMPLETE marker.
    """
    ckpts = complete_checkpoints(output_dir)
    latest = ckpts[-1] if ckpts else None
    if say is not None:
        newest = int(latest.name.removeprefix("step-")) if latest is not None else -1
        why = "an interrupted upload" if storage.remote(output_dir) is not None else "an interrupted save"
        for p in incomplete_checkpoints(output_dir):
            if int(p.name.removeprefix("step-")) > newest:
                say(f"checkpoints/{p.name} has no {COMPLETE} marker ({why}); "
                    + (f"resuming from {latest.name}" if latest is not None else "no complete checkpoint before it"))
    return latest


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict, *,
                    exclude_frozen: bool, keep: int, protect: set[int] = frozenset(),
                    owner: dict | None = None) -> Path:
    """Save a checkpoint of step ``step`` under output_dir/checkpoints. Collective: every rank calls it.

    ``owner`` (``job.json``: the job's identity and geometry, see :func:`check_owner`) is written before the
    COMPLETE marker. Keeps the newest ``keep`` checkpoints and the steps in ``protect`` (e.g. the monitor's
    best model within budget). Returns the checkpoint folder.
    """
    root = storage.local(output_dir) / "checkpoints"
    url = storage.remote(output_dir)
    tag = f"step-{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    save_rng_state(root / tag / f"rng_rank{dist.rank()}.safetensors")
    dist.barrier()
    if url is not None:  # each node's first rank uploads its ranks' files; the marker comes after all of them
        if storage.local_rank() == 0:
            storage.upload_tree(root / tag, url / "checkpoints" / tag)
        dist.barrier()
    deleted: list[str] = []
    if dist.is_main():
        if owner is not None:
            atomic_write_text(root / tag / OWNER, json.dumps(owner, indent=1, sort_keys=True) + "\n")
        if url is not None:
            if owner is not None:
                atomic_write_text(url / "checkpoints" / tag / OWNER, (root / tag / OWNER).read_text())
            storage.sync_files(output_dir)  # metrics.jsonl up to this checkpoint, the defences' state files
            atomic_write_text(url / "checkpoints" / tag / COMPLETE, f"{step}\n")  # last
        atomic_write_text(root / tag / COMPLETE, f"{step}\n")
        for old in complete_checkpoints(output_dir)[:-keep]:
            if int(old.name.removeprefix("step-")) not in protect:
                if url is not None:
                    old.rmtree()  # the marker first
                    deleted.append(old.name)
                shutil.rmtree(root / old.name, ignore_errors=True)
    if url is not None:  # the other nodes drop their copies of what rank 0 deleted
        for name in dist.broadcast_object(deleted):
            if storage.local_rank() == 0:
                shutil.rmtree(root / name, ignore_errors=True)
    dist.barrier()
    return root / tag


def check_owner(path: Path, owner: dict) -> None:
    """Refuse a checkpoint that this job did not write: another job's settings, or a global batch it cannot keep.

    Other batch keys or another number of workers that keep the global batch resume (distrib_ft/runtime/reshard.py).

    ``owner`` is ``{"world_size", "global_batch", "job"}`` (``job``: the resolved job less the keys a resume
    may change, see ``distrib_ft.job.Job.owner``).

    Raises:
        ValueError: one line naming the checkpoint and what differs (the first few keys).
    """
    file = storage.as_path(path) / OWNER
    if not file.is_file():
        raise ValueError(f"--resume: {path} has no {OWNER}: it was not written by this version of distrib-ft for "
                         "this job; use another training.output_dir")
    saved = json.loads(file.read_text())
    from distrib_ft.runtime import reshard  # another world size: the same global batch (reshard.py)

    reshard.check_geometry(path, saved, owner)
    theirs, ours = flatten(saved.get("job", {})), flatten(owner["job"])
    differ = sorted(k for k in theirs.keys() | ours.keys()
                    if theirs.get(k) != ours.get(k) and k not in reshard.GEOMETRY_KEYS)
    if differ:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ[:3])
        raise ValueError(f"--resume: {path} belongs to another job ({shown}"
                         f"{'; ...' if len(differ) > 3 else ''}); use another training.output_dir")



def load_checkpoint(engine, path: Path, *, exclude_frozen: bool) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the client state.

    ``path`` may be on a URL (or a staging folder's): each node's first rank downloads it first (collective).
    """
    path = storage.fetch(path)
    from distrib_ft.runtime import reshard  # written by another number of workers: DeepSpeed's universal checkpoint

    if reshard.needs_universal(engine, path):
        return reshard.load_universal(engine, path, exclude_frozen=exclude_frozen)
    try:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                 load_module_strict=not exclude_frozen)
    except ValueError as e:  # torch's Optimizer.load_state_dict: another grouping (engine.param_groups)
        if "number of parameter groups" not in str(e):
            raise
        raise ValueError(f"--resume: {path}: its optimizer state has another number of parameter groups than this job "
                         "builds (a ZeRO-3 checkpoint written before weight decay reached ZeRO-3's groups); resume "
                         "it with the distrib-ft version that wrote it, or train again in another "
                         "training.output_dir") from None
    if client_state is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint; delete it to resume from an older one")
    rng_file = path / f"rng_rank{dist.rank()}.safetensors"
    if rng_file.exists():  # absent when resuming with more ranks than were saved
        load_rng_state(rng_file)
    return client_state


def gather_full_state_dict(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The full fp32 weights on every rank's CPU (collective under ZeRO).

    Trainable parameters come from the optimizer's fp32 master copy (bf16 training keeps the module in
    bf16); frozen ones from the module, gathered when ZeRO-3 partitions them.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                full = p.data
                out[name] = full.detach().to("cpu", torch.float32, copy=True)
            continue
        out[name] = full.detach().to("cpu", torch.float32)
    return out


def export_final(model: torch.nn.Module, tokenizer, output_dir: str | Path, *, method,
                 name: str = "final") -> Path:
    """Write output_dir/name (final/, or rejected/ for a model out of budget) as ``method`` exports it.

    Atomically (temp folder, then rename). Collective; rank 0 writes.
    """
    state = gather_full_state_dict(model, trainable_only=exports_trainable_only(method))
    final = Path(output_dir) / name
    if dist.is_main():
        tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=output_dir))
        method.export(model, state, tmp)
        tokenizer.save_pretrained(tmp)
        storage.plain_modes(tmp, tree=True)  # mkdtemp's 0700, safetensors' 0600: as a plain mkdir / open
        if final.exists():
            old = final.with_name(f".final.old.{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    dist.barrier()
    return final
