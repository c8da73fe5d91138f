"""The training loop: ``train(job)`` = :func:`setup` -> :func:`run_steps` -> :func:`finish`.

``train`` runs unchanged in-process (a world of one), under torchrun, and inside Ray Train workers
(launcher/ray_job.py): whoever started the processes, torch.distributed is set up first and every rank
then runs the same code. The step loop (:func:`run_steps`) orders forward, penalties, backward and the
optimizer step in one place; the fine-tuning method (distrib_ft/methods/) and the defences
(distrib_ft/preservation/) enter only through their registries' contracts.

Loss normalisation: each micro-batch's loss is the *sum* of token NLLs scaled by
``world x accum / target_tokens_in_global_batch``; DeepSpeed divides by ``accum`` and averages over
ranks, so the gradient is that of the mean NLL over every target token of the global batch. The
result does not depend on padding, on how examples are split into micro-batches, or on the number
of ranks (a 2-rank and a 1-rank run with the same global batch take the same steps).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distrib_ft.config import dump_config
from distrib_ft.data import batches as batching
from distrib_ft.data.formats import build_dataset, collate
from distrib_ft.job import Job
from distrib_ft.methods import checkpoint_trainable_only
from distrib_ft.model import load_tokenizer
from distrib_ft.monitor.budget import Monitor, Suite, is_eval_step
from distrib_ft.monitor.drift import base_top_k, kl_to_base
from distrib_ft.monitor.evaluation import evaluate_nll, evaluate_suites, load_suites
from distrib_ft.monitor.report import write_report
from distrib_ft.preservation import Context, build_defences, call, chain, exported, load_tensors, merged
from distrib_ft.runtime import checkpoint as ckpt
from distrib_ft.runtime import dist, recovery, reshard, storage
from distrib_ft.runtime.loss import token_nll_rows
from distrib_ft.runtime.metrics import MetricsLog, Progress, StepWindow, Timings
from distrib_ft.runtime.netif import worker_record
from distrib_ft.runtime.worker import build_model_engine, start_worker
from distrib_ft.schema import flatten


@dataclass
class Run:
    """Everything the step loop and the finish share: what setup built, and the position."""

    job: Job
    out: Path
    engine: Any
    method: Any
    tokenizer: Any
    train_ds: Any
    train_stats: Any
    eval_ds: Any
    suites: list
    defences: list
    monitor: Monitor
    log: MetricsLog
    progress: Progress
    batches: Any  # iterator: this rank's new examples of each optimizer step
    max_steps: int
    per_rank: int
    global_batch: int
    mixed_share: float  # share of every global batch the defences mix in (replay)
    trainable: int
    total: int
    step: int = 0
    tokens_seen: int = 0
    saved: set[int] = field(default_factory=set)
    clock: Timings = field(default_factory=Timings)
    kl_cache: list | None = None  # the base model's top-k next-token log-probs on this rank's eval share
    attempts: list = field(default_factory=list)  # Ray Train's attempts of this run (runtime/recovery.py)

    @property
    def evaluating(self) -> bool:
        return self.eval_ds is not None or bool(self.suites)

    def client_state(self) -> dict:
        """The loop's state in every checkpoint (DeepSpeed's client_state)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "max_steps": self.max_steps,
                "monitor": self.monitor.state_dict(), "attempts": self.attempts,
                "strategies": {d.name: d.state_dict() for d in self.defences if hasattr(d, "state_dict")},
                "tensors": {d.name: d.tensors() for d in self.defences if hasattr(d, "tensors")}}  # e.g. the EMA


def train(job, resume: bool = False) -> dict:
    """Run one fine-tuning job on this process's rank. Returns the summary (on every rank).

    Args:
        job: a :class:`~distrib_ft.job.Job` resolved on the driver, or a validated JobConfig (resolved here).
        resume: continue from the newest complete checkpoint in ``training.output_dir``, if any.
    """
    run = setup(start_worker(job), resume)
    stop_reason = run_steps(run)
    return finish(run, stop_reason)


def setup(job: Job, resume: bool) -> Run:
    """Set a job up: data, model + method on the engine, defences, the resumed state, the monitor, logs.

    On a fresh start, also step 0's evaluation (the baselines).
    """
    cfg, t, d = job.config, job.config.training, job.config.data
    rank, world = dist.rank(), dist.world_size()
    clock = Timings()
    check_output_dir(job, resume)  # before anything is written there
    job = reshard.fit_resume(job, resume)  # a checkpoint of another world size: the batch keys keep its global batch
    cfg, t = job.config, job.config.training
    out = storage.local(t.output_dir)  # a URL's node-local staging folder (runtime/storage.py), else the folder
    storage.prepare(t.output_dir, resume)

    # Data: rank 0 prepares (and caches) first, the others then read the cache.
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    data_kwargs = dict(fmt=d.format, tokenizer=tokenizer, max_seq_length=d.max_seq_length,
                       prompt_template=d.prompt_template, text_field=d.text_field)
    train_ds, train_stats = dist.main_first(lambda: build_dataset(d.train_files, packing=d.packing,
                                                                  streaming=d.streaming, **data_kwargs))
    eval_ds, eval_stats = (dist.main_first(lambda: build_dataset(d.eval_files, **data_kwargs))
                           if d.eval_files else (None, None))
    train_summary = f"streamed from {len(d.train_files)} file(s)" if d.streaming else train_stats.summary()
    dist.print0(f"train data: {train_summary}")
    if eval_stats is not None:
        dist.print0(f"eval data: {eval_stats.summary()}")
    clock.lap("data")
    out.mkdir(parents=True, exist_ok=True)  # after the data: a bad record leaves output_dir as it was
    storage.check_shared(out)  # several nodes: a local output_dir they do not all see is refused
    if dist.is_main():
        ckpt.atomic_write_text(out / "config.yaml", dump_config(cfg))

    # The defences, then the schedule (a defence may mix its own examples into every batch).
    per_rank = t.per_device_train_batch_size * t.gradient_accumulation_steps
    defences = build_defences(cfg, Context.of(cfg, tokenizer))
    mixed_share = sum(getattr(x, "batch_share", 0.0) for x in defences)
    global_batch = per_rank * world
    max_steps = batching.total_steps(t.max_steps, t.num_train_epochs, None if d.streaming else len(train_ds),
                                     global_batch, mixed_share)
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * max_steps)

    engine, method, trainable, total = build_model_engine(job, total_steps=max_steps, warmup_steps=warmup)
    dist.print0(f"{method.name}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%); "
                f"ZeRO-{job.zero_stage}, bf16={t.bf16}, {world} worker(s), global batch {global_batch}, "
                f"{max_steps} steps")
    mc = cfg.monitor
    kl_cache = None
    if mc.kl_to_base:  # the base's log-probs, before any resume
        with as_base(method, engine.module):
            kl_cache = base_top_k(engine.module, eval_ds, k=mc.kl_top_k, batch_size=t.per_device_eval_batch_size,
                                  pad_token_id=tokenizer.pad_token_id)
    clock.lap("model and engine")
    call(defences, "check", zero_stage=job.zero_stage, model=engine.module, method=method)
    if not d.streaming:
        with as_base(method, engine.module):  # e.g. token masking's base-model pass
            train_ds = chain(defences, "prepare_train_data", train_ds, engine.module)

    # Resume: engine, optimizer, scheduler, RNG, the defences' and the monitor's state, and the step
    # (the data position is a function of it).
    latest = ckpt.latest_checkpoint(out, say=dist.print0) if resume else None
    attempt = recovery.current()
    if attempt.restarted:  # Ray restarted the workers (a worker died or hung): say why and from where
        dist.print0(recovery.resume_line(attempt, latest))
    state: dict = {}
    if latest is not None:
        state = ckpt.load_checkpoint(engine, latest, exclude_frozen=checkpoint_trainable_only(method))
        _schedule_lr(engine)  # a resume may change max_steps: the restored LR is the old schedule's
        for x in defences:
            if hasattr(x, "load_state_dict"):
                x.load_state_dict(state.get("strategies", {}).get(x.name, {}))
        load_tensors(defences, state)
        dist.print0(f"resumed from {latest} at step {state['step']}")
    elif resume:
        dist.print0(f"no complete checkpoint in {storage.public(out / 'checkpoints')}; starting from step 0")
    suites = load_suites(mc.suites, tokenizer, max_seq_length=d.max_seq_length, prompt_template=d.prompt_template)
    drift = [Suite("kl_to_base", "kl", "loss", max_value=mc.max_kl_to_base)] if kl_cache is not None else []
    monitor = Monitor([sd.suite for sd in suites] + drift, policy=mc.policy, patience=mc.early_stopping_patience,
                      min_delta=mc.early_stopping_min_delta)
    if "monitor" in state:
        monitor.load_state_dict(state["monitor"])
    call(defences, "on_task_start", engine.module, resumed=latest is not None)
    clock.lap("defences and resume")

    step = state.get("step", 0)
    steps_fn = batching.streaming_steps if d.streaming else batching.map_style_steps
    run = Run(job=job, out=out, engine=engine, method=method, tokenizer=tokenizer, train_ds=train_ds,
              train_stats=train_stats, eval_ds=eval_ds, suites=suites, defences=defences, monitor=monitor,
              log=MetricsLog(out / "metrics.jsonl", enabled=dist.is_main(), resume_step=step if latest else None,
                             report_to=t.report_to, run_name=storage.root(out).name,
                             params=flatten(cfg.model_dump(mode="json", by_alias=True))),
              progress=Progress(total=max_steps, initial=step, enabled=dist.is_main()),
              batches=steps_fn(train_ds, start_step=step, per_rank=per_rank, rank=rank, world=world, seed=t.seed,
                               replay_ratio=mixed_share),
              max_steps=max_steps, per_rank=per_rank, global_batch=global_batch, mixed_share=mixed_share,
              trainable=trainable, total=total, step=step, tokens_seen=state.get("tokens_seen", 0),
              saved={int(p.name.removeprefix("step-")) for p in ckpt.complete_checkpoints(out)} if resume else set(),
              clock=clock, kl_cache=kl_cache, attempts=recovery.history(state.get("attempts"), attempt, latest, step))
    if step == 0:
        start = merged(call(defences, "metrics"))  # e.g. the masked fraction of token masking
        if start:
            run.log.write({"step": 0, **start})
        if run.evaluating:  # the baselines: the base model's
            with as_base(method, engine.module):
                evaluate(run, 0)
    return run


def run_steps(run: Run) -> str | None:
    """Optimizer steps until ``max_steps`` or the monitor stops the run; returns why it stopped early."""
    t, engine, world = run.job.config.training, run.engine, dist.world_size()
    accum, micro_size, pad_id, device = t.gradient_accumulation_steps, t.per_device_train_batch_size, \
        run.tokenizer.pad_token_id, dist.device()
    own_grad_norm = run.job.zero_stage == 0  # DeepSpeed tracks it in its ZeRO optimizers only
    window, grad_norm, stop_reason = StepWindow(), None, None
    engine.train()
    while run.step < run.max_steps:
        # This rank's examples of one optimizer step (new ones, then those the defences mix in), in micro-batches.
        examples = chain(run.defences, "mix", next(run.batches), run.step)
        chunks = [examples[i:i + micro_size] for i in range(0, len(examples), micro_size)]
        micro = [{k: v.to(device, non_blocking=True) for k, v in collate(c, pad_id).items()} for c in chunks]
        global_targets, global_tokens = dist.all_reduce_sum(
            [sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
             sum(int(b["attention_mask"].sum()) for b in micro)])
        scale = world * accum / max(global_targets, 1)
        logging_step = (run.step + 1) % t.logging_steps == 0 or run.step + 1 == run.max_steps
        learning_rate = max(engine.get_lr())  # this step's (the top group's): the scheduler advances in step()
        for i, (chunk, batch) in enumerate(zip(chunks, micro)):
            nll, targets = token_nll_rows(engine, batch)  # forward: per-sequence NLL sums, (B,)
            call(run.defences, "observe", chunk, nll, targets)
            loss = nll.sum() * scale
            if i == len(micro) - 1:  # penalties once per step: DeepSpeed divides by accum and averages ranks
                penalties = [p for p in call(run.defences, "penalty", engine.module, logging=logging_step)
                             if p is not None]  # the value computed on logging steps only
                if penalties:
                    loss = loss + torch.stack(penalties).sum() * accum
            engine.backward(loss)
            if i == len(micro) - 1:  # gradients added in place into the reduced buffers, before norm and clipping
                call(run.defences, "add_to_grads", engine.module, logging=logging_step)
            if own_grad_norm and logging_step and i == len(micro) - 1:
                grad_norm = _grad_norm(engine.module)  # reduced, not yet clipped
            engine.step()
            window.nll += nll.sum().item()
        run.step += 1
        call(run.defences, "after_step", engine.module, run.step)  # e.g. the EMA's update
        run.tokens_seen += int(global_tokens)
        window.add_step(targets=global_targets, tokens=global_tokens)

        if logging_step:
            record = window.record(run.step, learning_rate=learning_rate, tokens_seen=run.tokens_seen,
                                   grad_norm=grad_norm if own_grad_norm else engine.get_global_grad_norm())
            record.update(merged(call(run.defences, "metrics")))
            if not run.job.config.data.streaming:
                record["epoch"] = _epoch(run)
            run.log.write(record)
            run.progress.update(window.steps, record)
            window = StepWindow()

        with window.paused():  # evaluations and checkpoints do not count in tokens_per_second
            if run.evaluating and is_eval_step(run.step, eval_at=run.job.config.monitor.eval_at,
                                               eval_steps=t.eval_steps, max_steps=run.max_steps):
                evaluate(run, run.step)
                stop_reason = run.monitor.should_stop()
            if t.save_steps and (run.step % t.save_steps == 0 or run.step == run.max_steps or stop_reason):
                save(run, run.step)
        if stop_reason:
            dist.print0(f"stopping at step {run.step}: {stop_reason}")
            break
    run.clock.lap("training")
    return stop_reason


def finish(run: Run, stop_reason: str | None) -> dict:
    """End a job: the checkpoint the monitor chooses becomes final/ (or rejected/, exit code 3).

    Also writes what the next round needs, the report and summary.json. Returns the summary.
    """
    cfg, out = run.job.config, run.out
    run.progress.close()
    call(run.defences, "close")
    if run.evaluating and run.monitor.steps[-1] != run.step:
        evaluate(run, run.step)
    chosen, decision = run.monitor.choose(run.step, sorted(run.saved)) if run.evaluating else (run.step, "accepted")
    if chosen is not None and chosen != run.step:
        dist.print0(f"restoring step {chosen}, the {'last' if cfg.monitor.policy == 'stop' else 'best'} model "
                    "within budget")
        restored = ckpt.load_checkpoint(run.engine, out / "checkpoints" / f"step-{chosen}",
                                        exclude_frozen=checkpoint_trainable_only(run.method))
        load_tensors(run.defences, restored)  # e.g. that checkpoint's EMA
    if chosen is None:
        dist.print0(f"no update stayed within the budget: the model of step {run.step} goes to rejected/ (exit code 3)")
    with exported(run.defences, run.engine.module, master=True):  # e.g. the EMA of the weights
        final = ckpt.export_final(run.engine.module, run.tokenizer, out, method=run.method,
                                  name="final" if chosen is not None else "rejected")
        if chosen is not None:  # what the next round needs (e.g. the Fisher of the data just learned)
            call(run.defences, "on_task_end", run.engine.module, final_dir=final, train_examples=run.train_ds)
    report = run.monitor.report(chosen, decision, notes=[stop_reason] if stop_reason else [])
    new_task = report["new_task"] or {}
    summary = {"output_dir": storage.public(out), "final": storage.public(final), "steps": run.step,
               "tokens_seen": run.tokens_seen,
               "trainable_parameters": run.trainable, "total_parameters": run.total, "world_size": dist.world_size(),
               "workers": dist.all_gather_object(worker_record()),  # rank order: node IP, host, pid
               "method": run.method.name, "artifact": run.method.artifact,
               "train_data": run.train_stats.summary(),  # streaming: counts of rank 0's reads
               **merged(call(run.defences, "summary")),
               "decision": decision, "exit_code": report["exit_code"], "chosen_step": chosen,
               "eval_loss_start": new_task.get("baseline"),
               "eval_loss": run.monitor.new_task_loss(chosen) if chosen is not None else None,
               "attempts": run.attempts}  # per attempt: the checkpoint it resumed from, why it ended
    run.log.close()
    if dist.is_main() and run.evaluating:
        write_report(report, out)
    run.clock.lap("export and report")
    summary["seconds"] = {k: round(v, 2) for k, v in run.clock.seconds.items()}
    if dist.is_main():
        ckpt.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        storage.publish_all(out)  # a URL output_dir: the results, final/'s marker and summary.json last
    dist.barrier()
    return summary


def evaluate(run: Run, at: int) -> None:
    """The new task's eval loss and every retention suite at step ``at``, recorded by the monitor and logged.

    With policy stop/rollback the model is checkpointed to go back to.
    """
    t, mc = run.job.config.training, run.job.config.monitor
    with run.clock.phase("evaluation"), exported(run.defences, run.engine.module):  # the model the job exports
        _evaluate(run, at, t.per_device_eval_batch_size)
    if mc.policy in ("stop", "rollback"):  # a model to go back to
        save(run, at)


def _evaluate(run: Run, at: int, batch_size: int) -> None:
    new = evaluate_nll(run.engine.module, run.eval_ds, batch_size=batch_size,
                       pad_token_id=run.tokenizer.pad_token_id) if run.eval_ds is not None else {}
    values = evaluate_suites(run.engine.module, run.tokenizer, run.suites, batch_size=batch_size)
    drift = (kl_to_base(run.engine.module, run.eval_ds, run.kl_cache, batch_size=batch_size,
                        pad_token_id=run.tokenizer.pad_token_id) if run.kl_cache is not None else {})
    run.monitor.record(at, {**values, **({"kl_to_base": drift["kl_to_base"]} if drift else {})}, new.get("eval_loss"))
    run.log.write({"step": at, **new, **{f"retention/{k}": v for k, v in values.items()}, **drift})
    shown = {"eval_loss": new.get("eval_loss"), **values, **({"kl_to_base": drift["kl_to_base"]} if drift else {})}
    dist.print0(f"step {at}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items() if v is not None)
                + ("" if run.monitor.within_budget(at) else "  [out of forgetting budget]"))


def save(run: Run, at: int) -> None:
    """Checkpoint step ``at`` (once), keeping the monitor's best model within budget. Collective."""
    if at in run.saved:
        return
    with run.clock.phase("checkpoints"):
        _save(run, at)


def _save(run: Run, at: int) -> None:
    keep_best = run.monitor.choose(at, sorted(run.saved | {at}))[0] if run.evaluating else None
    ckpt.save_checkpoint(run.engine, run.out, at, run.client_state(),
                         exclude_frozen=checkpoint_trainable_only(run.method),
                         keep=run.job.config.training.save_total_limit, protect={keep_best} - {None},
                         owner=run.job.owner())
    run.saved.add(at)


def check_output_dir(job: Job, resume: bool) -> None:
    """Refuse state on disk that belongs to another run.

    A fresh run in a folder with checkpoints, or a resume from a checkpoint another job (or another number of
    workers) wrote.

    Raises:
        ValueError: one line naming ``training.output_dir`` or the checkpoint and what to do.
    """
    out = storage.root(job.config.training.output_dir)  # a URL is read where it is
    if dist.is_main():
        storage.check_writable(out)  # a missing bucket or a bad key: one line before anything runs
    found = ckpt.complete_checkpoints(out)
    if not resume and found:
        raise ValueError(f"training.output_dir: {out} holds checkpoints of an unfinished run ({found[-1].name}); "
                         "use --resume to continue it, or another output_dir")
    if resume and found:
        ckpt.check_owner(found[-1], job.owner())
    restart = recovery.current().restarted  # this run's own final/, exported before a worker died: made again
    if resume and not found and not restart and ((out / "final").exists() or (out / "rejected").exists()):
        raise ValueError(f"--resume: {out} holds a finished run and no checkpoint to continue from "
                         "(training.save_steps was 0); use another training.output_dir")


def as_base(method, module):
    """The method's context in which ``module`` computes as the base model (its ``base_model``).

    A no-op for most methods: they start equal to the base.
    """
    return method.base_model(module) if hasattr(method, "base_model") else contextlib.nullcontext()


def _schedule_lr(engine) -> None:
    """Set every param group's LR from the (restored) scheduler's step and this job's schedule."""
    scheduler = engine.lr_scheduler
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def _epoch(run: Run) -> float:
    """Passes over the new data so far (mixed-in examples do not count)."""
    new_examples = run.step * run.global_batch - batching.replay_before(run.step, run.mixed_share, run.global_batch)
    return new_examples / (batching.steps_per_epoch(len(run.train_ds), run.global_batch) * run.global_batch)


def _grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
