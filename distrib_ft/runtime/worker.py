"""What every job does first on each worker: the process group, the seed, and the model on its engine."""

from __future__ import annotations

import random

import numpy as np
import torch

from distrib_ft.job import Job, resolve
from distrib_ft.methods import build_method
from distrib_ft.model import count_parameters, load_model
from distrib_ft.runtime import dist
from distrib_ft.runtime.engine import build_engine


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_worker(job) -> Job:
    """This process's environment and process group (in-process, torchrun or Ray), then the seed.

    Args:
        job: a :class:`~distrib_ft.job.Job` resolved on the driver, or a validated JobConfig (in-process
            callers: tests, benchmarks), resolved here for this world size.

    Returns:
        The job to run.

    Raises:
        ValueError: a job resolved for another world size than the process group's.
    """
    cfg = job.config if isinstance(job, Job) else job
    dist.apply_env(dist.worker_env(threads=cfg.distributed.cpus_per_worker, use_gpu=torch.cuda.is_available()))
    dist.init(cfg.distributed.backend)
    if not isinstance(job, Job):
        job = resolve(job, world_size=dist.world_size())
    if job.world_size != dist.world_size():
        raise ValueError(f"distributed.num_workers: the job was resolved for {job.world_size} workers but "
                         f"{dist.world_size()} started")
    set_seed(job.config.training.seed)
    return job


def build_model_engine(job: Job, *, total_steps: int, warmup_steps: int):
    """The model with its method on a DeepSpeed engine.

    Returns:
        ``(engine, method, trainable, total)``: the engine, the :class:`~distrib_ft.methods.Method`, and the
        trainable and total parameter counts.
    """
    cfg, t = job.config, job.config.training
    method = build_method(cfg.method)
    model = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                       gradient_checkpointing=t.gradient_checkpointing, trust_remote_code=cfg.model.trust_remote_code,
                       zero3_config=job.deepspeed if job.zero_stage == 3 else None)
    model = method.apply(model)
    trainable, total = count_parameters(model)
    engine = build_engine(model, job.deepspeed, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                          betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, warmup_steps=warmup_steps,
                          total_steps=total_steps, scheduler_type=t.lr_scheduler_type,
                          lr_scale=getattr(method, "lr_scale", None))
    return engine, method, trainable, total

