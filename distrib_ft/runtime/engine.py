"""DeepSpeed engine: the JSON from ds_configs/ merged with the job, the optimizer and the LR schedule.

The DeepSpeed JSON stays a plain DeepSpeed file. Values the job owns are ``"auto"`` there and are
filled in here; a JSON that pins one of them to a different value is an error, and so is an unknown
top-level key (DeepSpeed itself ignores those silently, so a typo would change nothing unnoticed).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from distrib_ft.schema import DuplicateKeyError, json_pairs_unique

# Top-level keys of a DeepSpeed config (DeepSpeed's config documentation, 0.19).
KNOWN_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "communication_data_type",
    "seq_parallel_communication_data_type", "disable_allgather", "activation_checkpointing",
    "flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet", "aio",
    "checkpoint", "data_types", "elasticity", "autotuning", "compression_training",
    "data_efficiency", "curriculum_learning", "pipeline", "compile", "timers", "dataloader_drop_last",
    "eigenvalue", "progressive_layer_drop", "sparse_attention", "hybrid_engine",
    "use_node_local_storage", "load_universal_checkpoint", "graph_harvesting", "weight_quantization",
    "nebula", "sequence_parallel_size", "tensor_parallel", "mics_shard_size",
    "mics_hierarchical_params_gather", "use_data_before_expert_parallelism",
})


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON that does not fit the job; one line naming the file and the key."""


def _fill(node: dict, key: str, value: Any, path: str, where: str, owner: str) -> None:
    if key not in node:
        node[key] = value
        return
    current = node[key]
    if current == "auto":
        node[key] = value
    elif _same(current, value):
        node[key] = value
    else:
        raise DeepSpeedConfigError(
            f"{where}: {path} is {current!r} but the job sets {value!r} ({owner}); "
            f"set it to \"auto\" in the JSON and change {owner} in the job instead")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def load_deepspeed_config(path: str | Path, *, micro_batch_size: int, gradient_accumulation_steps: int,
                          world_size: int, max_grad_norm: float, bf16: bool, learning_rate: float,
                          weight_decay: float, betas: tuple[float, float], eps: float) -> dict:
    """Read a DeepSpeed JSON and fill the values the job owns.

    Returns:
        The config dict for ``deepspeed.initialize``.

    Raises:
        DeepSpeedConfigError: the file is missing or malformed, has an unknown top-level key, or pins
            a job-owned value to something else.
    """
    where = str(path)
    try:
        raw = json.loads(Path(path).read_text(), object_pairs_hook=json_pairs_unique)
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"{where}: DeepSpeed config not found (distributed.deepspeed); "
                                   "use one of ds_configs/zero{0,1,2,3}.json") from None
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{where}: line {e.lineno}: not valid JSON: {e.msg}") from None
    except DuplicateKeyError as e:
        raise DeepSpeedConfigError(f"{where}: {e} (JSON keeps the last one silently); remove one") from None
    if not isinstance(raw, dict):
        raise DeepSpeedConfigError(f"{where}: the top level must be a JSON object")
    unknown = sorted(set(raw) - KNOWN_TOP_LEVEL_KEYS)
    if unknown:
        raise DeepSpeedConfigError(f"{where}: unknown top-level key {unknown[0]!r} (DeepSpeed would ignore it "
                                   "silently); remove it or fix its spelling")
    for key in ("zero_optimization", "bf16", "fp16", "optimizer", "torch_autocast"):
        if key in raw and not isinstance(raw[key], dict):
            raise DeepSpeedConfigError(f"{where}: {key}: expected a JSON object, got {raw[key]!r:.40}")
    cfg = copy.deepcopy(raw)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, "train_micro_batch_size_per_gpu", where,
          "training.per_device_train_batch_size")
    _fill(cfg, "gradient_accumulation_steps", gradient_accumulation_steps, "gradient_accumulation_steps", where,
          "training.gradient_accumulation_steps")
    _fill(cfg, "train_batch_size", micro_batch_size * gradient_accumulation_steps * world_size, "train_batch_size",
          where, "per_device_train_batch_size x gradient_accumulation_steps x num_workers")
    _fill(cfg, "gradient_clipping", float(max_grad_norm), "gradient_clipping", where, "training.max_grad_norm")
    bf16_node = cfg.setdefault("bf16", {})
    _fill(bf16_node, "enabled", bool(bf16), "bf16.enabled", where, "training.bf16")
    if cfg.get("fp16", {}).get("enabled") in (True, "auto"):
        raise DeepSpeedConfigError(f"{where}: fp16.enabled: fp16 is not supported; use bf16 (training.bf16)")
    if "scheduler" in cfg:
        raise DeepSpeedConfigError(f"{where}: scheduler: the LR schedule comes from the job "
                                   "(training.lr_scheduler_type, warmup_ratio); remove this section")
    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        if not isinstance(params, dict):
            raise DeepSpeedConfigError(f"{where}: optimizer.params: expected a JSON object, got {params!r:.40}")
        _fill(params, "lr", learning_rate, "optimizer.params.lr", where, "training.learning_rate")
        _fill(params, "weight_decay", weight_decay, "optimizer.params.weight_decay", where, "training.weight_decay")
        _fill(params, "betas", list(betas), "optimizer.params.betas", where, "training.adam_beta1/adam_beta2")
        _fill(params, "eps", eps, "optimizer.params.eps", where, "training.adam_epsilon")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero.get("stage", 0), int) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3")
    if zero.get("stage", 0) == 0 and cfg["bf16"]["enabled"]:
        # Without ZeRO, DeepSpeed's bf16 wraps the optimizer in FP16_UnfusedOptimizer, which steps AdamW once with
        # zero gradients at set-up (the first updates come out ~26% too small, weight decay is applied with no
        # data) and keeps no fp32 copy to export. Mixed precision through torch autocast instead: fp32 weights
        # and optimizer, bf16 matmuls (DeepSpeed's "torch_autocast" section).
        cfg["bf16"]["enabled"] = False
        _fill(cfg.setdefault("torch_autocast", {}), "enabled", True, "torch_autocast.enabled", where,
              "training.bf16 with ZeRO-0")
        _fill(cfg["torch_autocast"], "dtype", "bfloat16", "torch_autocast.dtype", where, "training.bf16 with ZeRO-0")
    return cfg


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage of a DeepSpeed config dict (``zero_optimization.stage``); 0 when it sets none."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay.

    ``cosine`` and ``linear`` decay to 0 at ``total_steps`` (Hugging Face conventions).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def param_groups(model: torch.nn.Module, weight_decay: float, learning_rate: float,
                 lr_scale=None) -> list[dict]:
    """The trainable parameters as optimizer groups.

    No weight decay on biases and norms (1-D tensors). ``lr_scale(name) -> float`` (a method's layer-wise
    learning rates) splits them further: one group per scale, with ``lr = learning_rate * scale``; the LR
    schedule multiplies every group's starting LR by the same factor (LambdaLR), so the ratios stay fixed.
    Groups come highest LR first.

    A parameter's rank is that of its full shape: a model loaded under ZeRO-3 (``zero.Init``) holds every weight
    as an empty 1-D placeholder and keeps the real shape in ``ds_shape`` (DeepSpeed's ``partition_parameters.py``);
    by ``p.ndim`` every weight would be a no-decay one (ZeRO-3 trained without weight decay before this).
    """
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        groups.setdefault((scale, len(getattr(p, "ds_shape", p.shape)) < 2), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr": learning_rate * scale}
            for (scale, no_decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]


def build_engine(model: torch.nn.Module, ds_config: dict, *, learning_rate: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, warmup_steps: int, total_steps: int,
                 scheduler_type: str, lr_scale=None):
    """``deepspeed.initialize`` with AdamW and the job's LR schedule; returns the engine.

    Without an ``optimizer`` section in the JSON, ``torch.optim.AdamW`` is the client optimizer
    (DeepSpeed's FusedAdam/CPUAdam would JIT-compile for minutes on CPU). ``lr_scale``: see :func:`param_groups`.
    """
    import deepspeed

    from distrib_ft.runtime.offload_ops import ensure_cpu_adam, offloads_optimizer

    groups = param_groups(model, weight_decay, learning_rate, lr_scale)
    if not groups:
        raise ValueError("the model has no trainable parameters: check method.type and its target modules")
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)

    if offloads_optimizer(ds_config):  # ZeRO's DeepSpeedCPUAdam: built once into the project's cache, or loaded
        ensure_cpu_adam()

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
            s, warmup_steps=warmup_steps, total_steps=total_steps, kind=scheduler_type))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           model_parameters=groups if optimizer is None else None,
                                           lr_scheduler=schedule, config=ds_config)
    _leave_out_frozen_aliases(engine)
    return engine


def _leave_out_frozen_aliases(engine) -> None:
    """Checkpoints that leave frozen weights out leave out every name of a tied one too.

    DeepSpeed's ``module_state_dict(exclude_frozen_parameters=True)`` deletes the names ``named_parameters()``
    yields, which names a tied weight once: a tied ``lm_head.weight`` stayed in every LoRA checkpoint (SmolLM2-135M:
    113 of its 123 MB). Loading such a checkpoint is already non-strict, and the tie is the module's own.
    """
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters=False, **kwargs):
        sd = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(name, None)
        return sd

    engine.module_state_dict = module_state_dict
