"""Evaluations during training: the new task's held-out loss and the retention suites of old skills.

Every evaluation is distributed the same way: each rank takes its share (``rank::world``), every rank runs
the same number of forward passes (ZeRO-3 gathers parameters collectively; a rank with a shorter share
repeats its last batch at zero weight), and the sums are all-reduced, so the result equals a
single-process evaluation of the whole set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distrib_ft.runtime import dist
from distrib_ft.data.formats import build_dataset, collate
from distrib_ft.monitor.budget import Suite


def token_nll_rows(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of next-token NLL over its target tokens (labels != -100), and their count.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels``, each (B, T).

    Returns:
        ``(nll, targets)``, each of shape (B,).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                            ignore_index=-100, reduction="none").view(shift_labels.shape)
    return nll.sum(dim=1), (shift_labels != -100).sum(dim=1)


def token_nll_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over the target tokens of a batch, and their count."""
    nll, targets = token_nll_rows(model, batch)
    return nll.sum(), int(targets.sum())


@torch.no_grad()
def evaluate_nll(model, dataset, *, batch_size: int, pad_token_id: int) -> dict[str, float]:
    """Token-weighted mean NLL over ``dataset`` (all ranks together)."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for idx, run in dist.share_batches(len(dataset), batch_size):
        weight = 1.0 if idx else 0.0
        batch = {k: v.to(dist.device()) for k, v in collate([dataset[i] for i in run], pad_token_id).items()}
        nll, n = token_nll_sum(model, batch)
        total_nll += weight * nll.item()
        total_tokens += int(weight) * n
    model.train(was_training)
    nll_sum, tokens = dist.all_reduce_sum([total_nll, total_tokens])
    loss = nll_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}


@dataclass
class SuiteData:
    """A retention suite with its data: a tokenized dataset (nll) or generation examples (the others)."""

    suite: Suite
    data: object
    max_new_tokens: int = 32
    pattern: str | None = None


def load_suites(suite_configs, tokenizer, *, max_seq_length: int, prompt_template: str) -> list[SuiteData]:
    """Prepare every suite's data (rank 0 first, then the others from the cache)."""
    out = []
    for sc in suite_configs:
        kind = "loss" if sc.metric == "nll" else "score"
        suite = Suite(sc.name, sc.metric, kind, max_relative_increase=sc.max_relative_increase,
                      max_absolute_drop=sc.max_absolute_drop)
        if sc.metric == "nll":
            ds, _ = dist.main_first(lambda sc=sc: build_dataset(sc.files, fmt=sc.format, tokenizer=tokenizer,
                                                                max_seq_length=max_seq_length,
                                                                prompt_template=prompt_template))
            data = ds.select(range(min(len(ds), sc.max_examples)))
        else:
            from distrib_ft.monitor.generation import examples_from_records

            data = examples_from_records(sc.files, sc.format, tokenizer, sc.max_examples)
        out.append(SuiteData(suite, data, sc.max_new_tokens, sc.pattern))
    return out


def evaluate_suites(model, tokenizer, suites: list[SuiteData], *, batch_size: int) -> dict[str, float]:
    """Each suite's value: mean token NLL (loss) or the score of greedy generations."""
    values = {}
    for sd in suites:
        if sd.suite.metric == "nll":
            values[sd.suite.name] = evaluate_nll(model, sd.data, batch_size=batch_size,
                                                 pad_token_id=tokenizer.pad_token_id)["eval_loss"]
        else:
            from distrib_ft.monitor.generation import score_generations

            values[sd.suite.name] = score_generations(model, tokenizer, sd.data, metric=sd.suite.metric,
                                                      max_new_tokens=sd.max_new_tokens, batch_size=batch_size,
                                                      pattern=sd.pattern)["score"]
    return values


def eval_job(cfg, model_path: str | None, out: str) -> dict:
    """``distrib-ft eval``: the job's retention suites and new-task eval set on the base model (step 0,
    "before") and on ``model_path`` (step 1, "after": a final/ folder with a peft adapter or a full model),
    with the job's budgets; writes report.json/md and plots to ``out``. Runs on every rank; rank 0 writes.

    The models are plain Hugging Face models on each rank (no DeepSpeed sharding), evaluated on each
    rank's share of every set with the sums all-reduced.
    """
    from pathlib import Path

    from distrib_ft.model import load_model, load_tokenizer
    from distrib_ft.monitor.budget import Monitor
    from distrib_ft.runtime.loop import start_worker

    start_worker(cfg)
    d, mc, t = cfg.data, cfg.monitor, cfg.training
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    suites = load_suites(mc.suites, tokenizer, max_seq_length=d.max_seq_length, prompt_template=d.prompt_template)
    eval_ds = (dist.main_first(lambda: build_dataset(d.eval_files, fmt=d.format, tokenizer=tokenizer,
                                                     max_seq_length=d.max_seq_length, prompt_template=d.prompt_template))[0]
               if d.eval_files else None)
    if not suites and eval_ds is None:
        raise ValueError("monitor.suites: nothing to evaluate; list retention suites or data.eval_files")
    monitor = Monitor([sd.suite for sd in suites], policy="report")
    model = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code).to(dist.device())
    for step, label in ((0, "base"), (1, "candidate")):
        if step == 1:
            if model_path is None:
                break
            if (Path(model_path) / "adapter_config.json").exists():
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, model_path)
            else:
                model = load_model(model_path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                                   attn_implementation=cfg.model.attn_implementation).to(dist.device())
        new = evaluate_nll(model, eval_ds, batch_size=t.per_device_eval_batch_size,
                           pad_token_id=tokenizer.pad_token_id) if eval_ds is not None else {}
        values = evaluate_suites(model, tokenizer, suites, batch_size=t.per_device_eval_batch_size)
        monitor.record(step, values, new.get("eval_loss"))
        dist.print0(f"{label}: " + ", ".join(f"{k}={v:.4f}" for k, v in {**values, **new}.items()
                                            if k not in ("eval_tokens", "eval_perplexity")))
    final_step = monitor.steps[-1]
    chosen, decision = monitor.choose(final_step, [])
    report = monitor.report(chosen, decision, notes=[f"step 0 = {cfg.model.name_or_path}",
                                                      f"step 1 = {model_path}" if model_path else "base model only"])
    if dist.is_main():
        from distrib_ft.monitor.report import write_report

        write_report(report, out)
    dist.barrier()
    return {"exit_code": report["exit_code"], "decision": decision}
