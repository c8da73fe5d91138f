"""Generative replay: when no old data is at hand, the base model writes pseudo-examples of what it can do.

Before training (``generative_replay:``), on the job's workers:

1. Prompts: the user's prompts (``prompts_files``), or self-instruct -- the model is shown three seed
   tasks (``seed_files``) and writes a new one in their style (a first generation pass).
2. Responses: the base model answers each prompt (sampling at ``temperature`` / ``top_p``).
3. Filters: empty or shorter than ``min_response_chars``; cut at ``max_new_tokens`` (length); a
   refusal ("I'm sorry", "As an AI", ...); a duplicate (the same response, after
   normalising case and spaces; with self-instruct also a repeated task). Rejected ones are replaced by
   drawing more, for up to ``max_rounds`` rounds, until ``num_examples`` are valid.

Each rank generates every ``world``-th prompt of a round (ranks make the same number of ``generate``
calls, so ZeRO-3 can gather together), the results are gathered and filtered identically on every
rank, and rank 0 writes them into the replay buffer as a new version with its own source
``generated-<hash of the settings>``. A resumed (or re-run) job finds that source and does not generate
again. This follows LAMOL (Sun et al., ICLR 2020: pseudo-samples at 5-20% of the new data) and SSR (Huang et al.,
ACL 2024: the base model generates by in-context learning).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from typing import ClassVar, Literal

import torch
from pydantic import Field

from distrib_ft.data import replay_buffer as rb
from distrib_ft.data.formats import DataError, validate_record
from distrib_ft.monitor.generation import _render, _user_prompt, generate_batch, normalize
from distrib_ft.runtime import dist
from distrib_ft.runtime.metrics import Progress
from distrib_ft.schema import InputPath, StorePath, Strict

REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i cannot|i can'?t|i can not|i am unable|"
                     r"i'?m unable|i'?m not able|i am not able|as an ai\b|as a language model)", re.IGNORECASE)
SELF_INSTRUCT = ("Here are some tasks for an assistant:\n\n{examples}\n\nWrite one new task, different from these, "
                 "in the same style. Reply with the task only.")


class GenerativeReplayConfig(Strict):
    """``generative_replay:``: before training, the base model writes pseudo-examples into a replay buffer.

    The pseudo-examples show what it can do; read them back with ``replay: {buffer: <the same>, ratio: ...}``.
    """

    buffer: StorePath | None = Field(None, description=(
        "The replay buffer to write into (a folder or fsspec URL; created when missing); usually replay.buffer."))
    prompts_files: list[InputPath] = Field(default_factory=list, description=(
        "Prompts the base model answers (alpaca records' instruction/input, chat records' turns up to the last "
        "user message, or text records), one pseudo-example each."))
    prompts_format: Literal["alpaca", "chat", "text"] = Field("alpaca", description="Format of prompts_files.")
    seed_files: list[InputPath] = Field(default_factory=list, description=(
        "Self-instruct: a few example tasks (alpaca or chat records); the model writes new instructions in "
        "their style, then answers them. Used when prompts_files is empty."))
    num_examples: int = Field(200, ge=1, description=(
        "Valid pseudo-examples to produce (more are drawn to replace rejected ones)."))
    max_new_tokens: int = Field(128, ge=1, description="Longest response; a response cut here is rejected (length).")
    keep_unfinished: bool = Field(False, description="Keep responses cut at max_new_tokens instead of rejecting them.")
    min_response_chars: int = Field(8, ge=1, description="Shorter responses are rejected (empty / too short).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call on each worker.")
    max_rounds: int = Field(8, ge=1, description="Rounds of generation before giving up on reaching num_examples.")

    @property
    def enabled(self) -> bool:
        return bool(self.buffer or self.prompts_files or self.seed_files)

    def check_job(self, job) -> None:
        """Cross-checks with the rest of the job (ValueError naming the key)."""
        if not self.buffer:
            raise ValueError("generative_replay.buffer: the replay buffer to write the pseudo-examples into")
        if not (self.prompts_files or self.seed_files):
            raise ValueError("generative_replay: give prompts_files (prompts to answer) or seed_files (self-instruct)")
        if job.replay.buffer == self.buffer and job.replay.version is not None:
            raise ValueError("replay.version: generative replay adds a new version to replay.buffer; leave "
                             "replay.version unset")


class GenerativeReplay:
    name: ClassVar[str] = "generative_replay"
    config_class: ClassVar[type[Strict]] = GenerativeReplayConfig

    def __init__(self, config: GenerativeReplayConfig, ctx):
        self.config, self.ctx = config, ctx

    def on_task_start(self, model, *, resumed: bool) -> None:
        ensure_generated(model, self.ctx.tokenizer, self.config.buffer, self.config, seed=self.ctx.seed,
                         model_name=self.ctx.model_name)


def generated_source_name(gen, model_name: str) -> str:
    """The buffer source name of one generation setting on one model (a re-run finds it and does not generate)."""
    settings = gen.model_dump(mode="json", exclude={"buffer"})
    key = json.dumps({"settings": settings, "model": model_name}, sort_keys=True)
    return "generated-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def ensure_generated(model, tokenizer, buffer: str, gen, *, seed: int, model_name: str = "") -> None:
    """Generate the pseudo-examples into ``buffer`` unless it already holds them. Collective."""
    name = generated_source_name(gen, model_name)
    have = False
    if dist.is_main() and rb.list_versions(buffer):
        have = any(s["name"] == name for s in rb.read_manifest(buffer)["sources"])
    if dist.broadcast_object(have):
        dist.print0(f"generative replay: {buffer} already holds {name}; not generating again")
        return
    records, rejected = generate_records(model, tokenizer, gen, seed=seed)
    if dist.is_main():
        m = rb.update(buffer, [], extra_rows={name: records}, seed=seed, create=not rb.list_versions(buffer))
        why = ", ".join(f"{k} {v}" for k, v in rejected.items() if v) or "none"
        dist.print0(f"generative replay: {len(records)} pseudo-examples -> {buffer} version {m['version']} "
                    f"(source {name}; rejected: {why})")
    dist.barrier()


def prompt_conversations(files: list[str], fmt: str) -> list[list[dict]]:
    """Prompts as conversations that end with a user turn.

    From alpaca (instruction + input), text, or chat records (every turn up to the last user message).
    """
    out = []
    for url in files:
        for where, rec in rb.iter_records(url):
            if fmt == "alpaca":
                if not isinstance(rec.get("instruction"), str):
                    raise DataError(f"{where}: field 'instruction': missing (prompts need an instruction)")
                inp = rec.get("input") or ""
                out.append([{"role": "user", "content": rec["instruction"] + ("\n\n" + inp if inp else "")}])
            elif fmt == "text":
                validate_record(rec, "text", where)
                out.append([{"role": "user", "content": rec["text"]}])
            else:
                msgs = rec.get("messages")
                if not isinstance(msgs, list) or not any(isinstance(m, dict) and m.get("role") == "user" for m in msgs):
                    raise DataError(f"{where}: field 'messages': needs a user turn")
                last_user = max(i for i, m in enumerate(msgs) if m.get("role") == "user")
                out.append([{"role": m["role"], "content": m["content"]} for m in msgs[:last_user + 1]])
    if not out and files:
        raise DataError(f"{files[0]}: no prompts")
    return out


def seed_tasks(files: list[str]) -> list[str]:
    """Self-instruct seeds: the user turns of alpaca or chat records."""
    tasks = []
    for url in files:
        first = next(rb.iter_records(url), (None, {}))[1]
        tasks += [c[-1]["content"] for c in prompt_conversations([url], "chat" if "messages" in first else "alpaca")]
    if len(tasks) < 2:
        raise DataError(f"{files[0]}: self-instruct needs at least 2 seed tasks")
    return tasks


def reject_reason(prompt: str, response: str, finished: bool, seen: set[str], gen) -> str | None:
    """Why a pseudo-example is rejected, or None; ``seen`` holds the normalised prompts and responses kept."""
    text = response.strip()
    if len(text) < gen.min_response_chars:
        return "empty"
    if not finished and not gen.keep_unfinished:
        return "length"
    if REFUSAL.search(text):
        return "refusal"
    if normalize(prompt) in seen or normalize(text) in seen:
        return "duplicate"
    return None


def generate_records(model, tokenizer, gen, *, seed: int) -> tuple[list[dict], dict[str, int]]:
    """``num_examples`` valid pseudo-examples and the count of rejections per reason.

    The examples are alpaca records for one user turn, chat records otherwise. Collective: every rank calls it
    and gets the same result.
    """
    user_prompts = prompt_conversations(gen.prompts_files, gen.prompts_format) if gen.prompts_files else None
    seeds = seed_tasks(gen.seed_files) if user_prompts is None else None
    rng = random.Random(seed)
    order = list(range(len(user_prompts))) if user_prompts else []
    rng.shuffle(order)
    records, seen, rejected = [], set(), {"empty": 0, "length": 0, "refusal": 0, "duplicate": 0}
    progress, progress_done = Progress(total=gen.num_examples, initial=0, enabled=dist.is_main(), desc="generate"), 0
    with torch.random.fork_rng(devices=[]):
        for round_ in range(gen.max_rounds):
            need = gen.num_examples - len(records)
            if need <= 0:
                break
            draw = math.ceil(need * 1.5) + dist.world_size()
            torch.manual_seed(seed * 1_000_003 + round_ * 101 + dist.rank())
            if user_prompts is not None:
                convs = [user_prompts[order[(round_ * draw + i) % len(order)]] for i in range(draw)]
            else:
                asks = [[{"role": "user", "content": SELF_INSTRUCT.format(
                    examples="\n".join(f"Task: {t}" for t in rng.sample(seeds, min(3, len(seeds)))))}]
                    for _ in range(draw)]
                tasks = _generate_all(model, tokenizer, asks, gen)
                convs = [[{"role": "user", "content": _first_line(t)}] for t, _ in tasks if _first_line(t)]
            answers = _generate_all(model, tokenizer, convs, gen)
            for conv, (text, finished) in zip(convs, answers):
                prompt = conv[-1]["content"]
                why = reject_reason(prompt, text, finished, seen, gen)
                if why:
                    rejected[why] += 1
                    continue
                if len(records) < gen.num_examples:  # a user prompt may be answered more than once
                    seen.update({normalize(text.strip())} | ({normalize(prompt)} if seeds else set()))
                    records.append(_record(conv, text.strip()))
            progress.update(min(len(records), gen.num_examples) - progress_done)
            progress_done = len(records)
    progress.close()
    if len(records) < gen.num_examples:
        raise DataError(f"generative_replay: only {len(records)} of {gen.num_examples} pseudo-examples passed the "
                        f"filters in {gen.max_rounds} rounds (rejected: {rejected}); raise max_rounds or "
                        "max_new_tokens, or give more prompts")
    return records, rejected


def _first_line(text: str) -> str:
    line = next((x for x in text.strip().splitlines() if x.strip()), "")
    return re.sub(r"^\W*(new\s+)?task\s*\d*\s*:\s*", "", line.strip(), flags=re.IGNORECASE).strip()


def _record(conv: list[dict], response: str) -> dict:
    if len(conv) == 1:
        return {"instruction": conv[0]["content"], "input": "", "output": response}
    return {"messages": [*conv, {"role": "assistant", "content": response}]}


def _generate_all(model, tokenizer, convs: list[list[dict]], gen) -> list[tuple[str, bool]]:
    """Generations for every conversation: each rank every world-th, in equal numbers of batches; gathered."""
    prompts = [_user_prompt(tokenizer, c[0]["content"], "") if len(c) == 1 else _render(tokenizer, c) for c in convs]
    out: dict[int, tuple[str, bool]] = {}
    was_training = model.training
    model.eval()
    try:
        for idx, run in dist.share_batches(len(prompts), gen.batch_size):
            texts = generate_batch(model, tokenizer, [prompts[i] for i in run], max_new_tokens=gen.max_new_tokens,
                                   device=dist.device(), synced=dist.world_size() > 1, temperature=gen.temperature,
                                   top_p=gen.top_p)
            out.update(zip(idx, texts))
    finally:
        model.train(was_training)
    return dist.gather_shares(out, len(prompts))
