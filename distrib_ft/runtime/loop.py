"""The training loop: one function that orders forward, backward, step, log, eval and checkpoint.

``train(cfg)`` runs unchanged in-process (a world of one), under torchrun, and inside Ray Train
workers (``launcher.ray_job``): whoever started the processes, torch.distributed is set up first and
every rank then runs the same code.

Loss normalisation: each micro-batch's loss is the *sum* of token NLLs scaled by
``world x accum / target_tokens_in_global_batch``; DeepSpeed divides by ``accum`` and averages over
ranks, so the gradient is that of the mean NLL over every target token of the global batch. The
result does not depend on padding, on how examples are split into micro-batches, or on the number
of ranks (a 2-rank and a 1-rank run with the same global batch take the same steps).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from distrib_ft.data import batches as batching
from distrib_ft.runtime import checkpoint as ckpt
from distrib_ft.runtime import dist
from distrib_ft.config import JobConfig, dump_config
from distrib_ft.data.formats import build_dataset, collate
from distrib_ft.runtime.engine import build_engine, load_deepspeed_config, zero_stage
from distrib_ft.monitor.evaluation import evaluate_nll, evaluate_suites, load_suites, token_nll_rows
from distrib_ft.runtime.metrics import MetricsLog, Progress
from distrib_ft.monitor.budget import Monitor, is_eval_step
from distrib_ft.model import (apply_method, count_parameters, load_model, load_tokenizer, merge_adapters,
                             resolve_offline_model)
from distrib_ft.preservation import build_strategies


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _flat(d: dict, prefix: str = "") -> dict:
    """{"training": {"seed": 1}} -> {"training.seed": 1}, for loggers' parameters."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def start_worker(cfg: JobConfig) -> None:
    """This process's environment and process group (in-process, torchrun or Ray); ``offline:`` model names
    resolved to their cached folder (the CLI has done it already when it launched the workers)."""
    if cfg.model.name_or_path.startswith("offline:"):
        cfg.model.name_or_path = str(resolve_offline_model(cfg.model.name_or_path))
    dist.apply_env(dist.worker_env(threads=cfg.distributed.cpus_per_worker, use_gpu=torch.cuda.is_available()))
    dist.init(cfg.distributed.backend)
    set_seed(cfg.training.seed)


def build_model_engine(cfg: JobConfig, *, total_steps: int, warmup_steps: int):
    """Model, method and DeepSpeed engine. Returns (engine, ds_config, trainable, total) parameter counts."""
    t, m = cfg.training, cfg.method
    ds_config = load_deepspeed_config(
        cfg.distributed.deepspeed, micro_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, world_size=dist.world_size(),
        max_grad_norm=t.max_grad_norm, bf16=t.bf16, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    zero3 = zero_stage(ds_config) == 3
    if zero3 and m.merge_adapters:
        raise ValueError("method.merge_adapters: not supported under ZeRO-3 (merging needs whole weights); "
                         "use zero2.json, or merge the adapters into a model folder first")
    model = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                       gradient_checkpointing=t.gradient_checkpointing, trust_remote_code=cfg.model.trust_remote_code,
                       zero3_config=ds_config if zero3 else None)
    model = merge_adapters(model, m.merge_adapters)
    model = apply_method(model, m.type, r=m.r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                         target_modules=m.target_modules, use_dora=m.use_dora)
    trainable, total = count_parameters(model)
    engine = build_engine(model, ds_config, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                          betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, warmup_steps=warmup_steps,
                          total_steps=total_steps, scheduler_type=t.lr_scheduler_type)
    return engine, ds_config, trainable, total


def train(cfg: JobConfig, resume: bool = False) -> dict:
    """Run one fine-tuning job on this process's rank. Returns a summary (every rank).

    Args:
        cfg: the validated job.
        resume: continue from the newest complete checkpoint in ``training.output_dir`` if any.
    """
    t, d = cfg.training, cfg.data
    start_worker(cfg)
    rank, world, device = dist.rank(), dist.world_size(), dist.device()
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        ckpt.atomic_write_text(out / "config.yaml", dump_config(cfg))

    # Data: rank 0 prepares (and caches) first, the others then read the cache.
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    data_kwargs = dict(fmt=d.format, tokenizer=tokenizer, max_seq_length=d.max_seq_length,
                       prompt_template=d.prompt_template, text_field=d.text_field)
    train_ds, train_stats = dist.main_first(lambda: build_dataset(d.train_files, packing=d.packing,
                                                                  streaming=d.streaming, **data_kwargs))
    eval_ds, eval_stats = (dist.main_first(lambda: build_dataset(d.eval_files, **data_kwargs))
                           if d.eval_files else (None, None))
    dist.print0(f"train data: {'streamed from ' + str(len(d.train_files)) + ' file(s)' if d.streaming else train_stats.summary()}")
    if eval_stats is not None:
        dist.print0(f"eval data: {eval_stats.summary()}")
    per_rank = t.per_device_train_batch_size * t.gradient_accumulation_steps
    global_batch, replay_ratio = per_rank * world, cfg.replay.ratio
    max_steps = batching.total_steps(t.max_steps, t.num_train_epochs, None if d.streaming else len(train_ds),
                                     global_batch, replay_ratio)
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * max_steps)

    # Model, method, DeepSpeed engine; the defences against forgetting.
    engine, ds_config, trainable, total = build_model_engine(cfg, total_steps=max_steps, warmup_steps=warmup)
    is_peft = cfg.method.type == "lora"
    dist.print0(f"{cfg.method.type}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%); "
                f"ZeRO-{zero_stage(ds_config)}, bf16={t.bf16}, {world} worker(s), global batch {global_batch}, "
                f"{max_steps} steps")
    masking = None  # Selective Token Masking: a base-model pass over the new data before any update (cached)
    if d.token_masking.mode != "off":
        from distrib_ft.preservation.token_masking import apply_token_masking

        tm = d.token_masking
        train_ds, masking = apply_token_masking(engine.module, train_ds, mode=tm.mode, threshold=tm.threshold,
                                                batch_size=tm.batch_size, pad_token_id=tokenizer.pad_token_id,
                                                output_dir=out, model_name=cfg.model.name_or_path, seed=t.seed)
    strategies = build_strategies(cfg, tokenizer)
    for s in strategies:
        s.check(zero_stage=zero_stage(ds_config), model=engine.module)

    # Resume: engine, optimizer, scheduler, RNG and the step (the data position is a function of it).
    step, tokens_seen = 0, 0
    latest = ckpt.latest_checkpoint(out) if resume else None
    if latest is not None:
        state = ckpt.load_checkpoint(engine, latest, exclude_frozen=is_peft)
        step, tokens_seen = state["step"], state["tokens_seen"]
        for s in strategies:
            s.load_state_dict(state.get("strategies", {}).get(s.name, {}))
        dist.print0(f"resumed from {latest} at step {step}")
    elif resume:
        dist.print0(f"no complete checkpoint in {out / 'checkpoints'}; starting from step 0")
    # The forgetting monitor (distrib_ft/monitor/budget.py): the new task and the retention suites from step 0,
    # their budget, and which checkpoint becomes final/.
    mc = cfg.monitor
    suites = load_suites(mc.suites, tokenizer, max_seq_length=d.max_seq_length, prompt_template=d.prompt_template)
    monitor = Monitor([sd.suite for sd in suites], policy=mc.policy, patience=mc.early_stopping_patience,
                      min_delta=mc.early_stopping_min_delta)
    if latest is not None and "monitor" in state:
        monitor.load_state_dict(state["monitor"])
    client_state = lambda: {"step": step, "tokens_seen": tokens_seen, "max_steps": max_steps,  # noqa: E731
                            "monitor": monitor.state_dict(), "strategies": {s.name: s.state_dict() for s in strategies}}
    for s in strategies:  # state (e.g. Fisher, anchors) of the job's start; persisted for resume
        s.on_task_start(engine.module, output_dir=out, resumed=latest is not None)

    steps_fn = batching.streaming_steps if d.streaming else batching.map_style_steps
    step_examples = steps_fn(train_ds, start_step=step, per_rank=per_rank, rank=rank, world=world, seed=t.seed,
                             replay_ratio=replay_ratio)
    log = MetricsLog(out / "metrics.jsonl", enabled=dist.is_main(), resume_step=step if latest else None,
                     report_to=t.report_to, run_name=out.name, params=_flat(cfg.model_dump(mode="json", by_alias=True)))
    progress = Progress(total=max_steps, initial=step, enabled=dist.is_main())
    if masking and step == 0:
        log.write({"step": 0, "masked_fraction": masking["masked_fraction"], "masked_tokens": masking["masked_tokens"]})
    pad_id = tokenizer.pad_token_id
    new_window = lambda: {"nll": 0.0, "targets": 0, "tokens": 0, "penalty": 0.0, "time": time.time(), "steps": 0,  # noqa: E731
                          "replay_nll": 0.0, "replay_targets": 0, "replay_sequences": 0}
    window = new_window()
    grad_norm = stop_reason = None
    # DeepSpeed tracks the gradient norm in its ZeRO / bf16 optimizers only, not for plain fp32 ZeRO-0.
    own_grad_norm = zero_stage(ds_config) == 0 and not t.bf16
    evaluating = eval_ds is not None or bool(suites)
    saved = {int(p.name.removeprefix("step-")) for p in ckpt.complete_checkpoints(out)}

    def save(at: int) -> None:
        if at not in saved:
            keep_best = monitor.choose(at, sorted(saved | {at}))[0] if evaluating else None
            ckpt.save_checkpoint(engine, out, at, client_state(), exclude_frozen=is_peft, keep=t.save_total_limit,
                                 protect={keep_best} - {None})
            saved.add(at)

    def run_eval(at: int) -> None:
        new = evaluate_nll(engine.module, eval_ds, batch_size=t.per_device_eval_batch_size,
                           pad_token_id=pad_id) if eval_ds is not None else {}
        values = evaluate_suites(engine.module, tokenizer, suites, batch_size=t.per_device_eval_batch_size)
        monitor.record(at, values, new.get("eval_loss"))
        log.write({"step": at, **new, **{f"retention/{k}": v for k, v in values.items()}})
        shown = {"eval_loss": new.get("eval_loss"), **values}
        dist.print0(f"step {at}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items() if v is not None)
                    + ("" if monitor.within_budget(at) else "  [out of forgetting budget]"))
        if mc.policy in ("stop", "rollback"):  # a model to go back to
            save(at)

    if evaluating and step == 0:  # the baselines, before any update
        run_eval(0)
        window = new_window()

    engine.train()
    while step < max_steps:
        # One optimizer step over this rank's examples (new, then replayed old ones), in micro-batches.
        examples = next(step_examples)
        for s in strategies:
            examples = s.mix(step, examples)
        chunks = [examples[i:i + t.per_device_train_batch_size] for i in range(0, per_rank, t.per_device_train_batch_size)]
        micro = [_to(collate(mb, pad_id), device) for mb in chunks]
        is_replay = [torch.tensor([bool(e.get("replay")) for e in mb], device=device) for mb in chunks]
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        local_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        global_targets, global_tokens = dist.all_reduce_sum([local_targets, local_tokens])
        scale = world * t.gradient_accumulation_steps / max(global_targets, 1)
        step_nll = 0.0
        for i, b in enumerate(micro):
            rows, row_targets = token_nll_rows(engine, b)
            nll = rows.sum()
            if replay_ratio:
                window["replay_nll"] += float(rows.detach()[is_replay[i]].sum())
                window["replay_targets"] += int(row_targets[is_replay[i]].sum())
            loss = nll * scale
            if i == len(micro) - 1:  # penalties once per step: DeepSpeed divides by accum, averages ranks
                penalties = [p for p in (s.penalty(engine.module) for s in strategies) if p is not None]
                if penalties:
                    penalty = torch.stack(penalties).sum()
                    loss = loss + penalty * t.gradient_accumulation_steps
                    window["penalty"] += penalty.item()
            engine.backward(loss)
            if own_grad_norm and i == len(micro) - 1 and ((step + 1) % t.logging_steps == 0 or step + 1 == max_steps):
                grad_norm = _grad_norm(engine.module)  # grads are reduced, not yet clipped
            engine.step()
            step_nll += nll.item()
        step += 1
        tokens_seen += int(global_tokens)
        window["nll"] += step_nll
        window["targets"] += global_targets
        window["tokens"] += global_tokens
        window["steps"] += 1
        window["replay_sequences"] += sum(batching.replay_counts(step - 1, replay_ratio, global_batch, world))

        if step % t.logging_steps == 0 or step == max_steps:
            nll_sum, replay_nll, replay_targets = dist.all_reduce_sum(
                [window["nll"], window["replay_nll"], window["replay_targets"]])
            elapsed = time.time() - window["time"]
            if not own_grad_norm:
                grad_norm = engine.get_global_grad_norm()
            record = {"step": step, "loss": nll_sum / max(window["targets"], 1), "learning_rate": engine.get_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens_per_second": window["tokens"] / max(elapsed, 1e-9),
                      "tokens_seen": tokens_seen}
            if strategies and cfg.ewc.lambda_ > 0:
                record["ewc_penalty"] = window["penalty"] / window["steps"]
            if replay_ratio:  # sequences: the whole global batches since the last line
                record.update(loss_new=(nll_sum - replay_nll) / max(window["targets"] - replay_targets, 1),
                              loss_replay=replay_nll / max(replay_targets, 1),
                              new_sequences=window["steps"] * global_batch - window["replay_sequences"],
                              replay_sequences=window["replay_sequences"])
            for s in strategies:
                record.update(s.metrics())
            if not d.streaming:
                record["epoch"] = ((step * global_batch - batching.replay_before(step, replay_ratio, global_batch))
                                   / (batching.steps_per_epoch(len(train_ds), global_batch) * global_batch))
            log.write(record)
            progress.update(window["steps"], record)
            window = new_window()

        paused = time.time()  # evaluations and checkpoints do not count in the next line's tokens_per_second
        if evaluating and is_eval_step(step, eval_at=mc.eval_at, eval_steps=t.eval_steps, max_steps=max_steps):
            run_eval(step)
            stop_reason = monitor.should_stop()
        if t.save_steps and (step % t.save_steps == 0 or step == max_steps or stop_reason):
            save(step)
        window["time"] += time.time() - paused
        if stop_reason:
            dist.print0(f"stopping at step {step}: {stop_reason}")
            break
    progress.close()
    for s in strategies:
        s.close()

    # The end: the checkpoint the monitor chooses becomes final/ (or rejected/, exit code 3), the report.
    if evaluating and monitor.steps[-1] != step:
        run_eval(step)
    chosen, decision = monitor.choose(step, sorted(saved)) if evaluating else (step, "accepted")
    if chosen is not None and chosen != step:
        dist.print0(f"restoring step {chosen}, the {'last' if mc.policy == 'stop' else 'best'} model within budget")
        ckpt.load_checkpoint(engine, out / "checkpoints" / f"step-{chosen}", exclude_frozen=is_peft)
    final = ckpt.export_final(engine.module, tokenizer, out, is_peft=is_peft,
                              name="final" if chosen is not None else "rejected")
    if chosen is not None:
        for s in strategies:  # what the next round needs (e.g. the Fisher of the data just learned)
            s.on_task_end(engine.module, final_dir=final, train_examples=train_ds)
    report = monitor.report(chosen, decision, notes=[stop_reason] if stop_reason else [])
    new_task = report["new_task"] or {}
    summary = {"output_dir": str(out), "final": str(final), "steps": step, "tokens_seen": tokens_seen,
               "trainable_parameters": trainable, "total_parameters": total, "world_size": world,
               "train_data": train_stats.summary(),  # streaming: counts of rank 0's reads
               "token_masking": masking, "decision": decision, "exit_code": report["exit_code"], "chosen_step": chosen,
               "eval_loss_start": new_task.get("baseline"),
               "eval_loss": monitor.new_task_loss(chosen) if chosen is not None else None}
    log.close()
    if dist.is_main():
        if evaluating:
            from distrib_ft.monitor.report import write_report

            write_report(report, out)
        ckpt.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    return summary


def fisher_job(cfg: JobConfig, out: str) -> dict:
    """``distrib-ft fisher``: the Fisher of the job's model and method on ``ewc.fisher_files``, written to
    ``out`` (safetensors) with the anchors (target=trainable). Runs on every rank; rank 0 writes."""
    from distrib_ft.preservation.fisher import save_fisher
    from distrib_ft.preservation.ewc import EWC

    start_worker(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    engine, ds_config, _, _ = build_model_engine(cfg, total_steps=1, warmup_steps=0)
    ewc = EWC.from_config(cfg, tokenizer)
    fisher, info = ewc.compute(engine.module, ewc.fisher_examples())
    anchors = ewc.current_anchors(engine.module)
    if dist.is_main():
        save_fisher(out, fisher, info, anchors)
        dist.print0(f"fisher: {info['estimator']} over {info['sequences']} sequences ({info['target_tokens']} target "
                    f"tokens), {len(fisher)} tensors -> {out}")
    dist.barrier()
    return info
