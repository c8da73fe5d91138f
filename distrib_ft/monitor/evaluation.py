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

from distrib_ft.data.formats import build_dataset, collate
from distrib_ft.monitor.budget import Suite
from distrib_ft.runtime import dist
from distrib_ft.runtime.loss import token_nll_sum


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
