"""Generation-based retention metrics: does the model still *answer* old prompts, not only assign them a low loss?

An example is ``{"prompt": str, "reference": str, "choices": list[str] | None}``; the prompt is already
rendered (chat template and generation prompt included). Metrics (``metric``):

- ``exact_match``: the generation equals the reference after normalisation (strip, collapse
  whitespace, lower case).
- ``contains``: the normalised reference appears in the normalised generation.
- ``regex``: ``re.search(pattern or reference, generation)`` finds a match (raw generation).
- ``multiple_choice``: nothing is generated; each choice is appended to the prompt as it is (mind the
  leading space) and scored by its summed token log-likelihood; correct when the argmax is ``reference``.

Generation is greedy (``do_sample=False``) up to ``max_new_tokens`` or eos, prompts left-padded in a
batch; only the new tokens are decoded, cut at the first eos. Distributed like ``train.evaluate``:
rank r scores examples ``r::world``; every rank runs the same number of ``generate``/forward calls
(a rank with a shorter share repeats an example with zero weight), ``generate`` runs with
``synced_gpus=True`` when world > 1 (ZeRO-3 gathers parameters collectively at every decoding step,
so a rank that is done keeps stepping until all are), and the (correct, count) sums are all-reduced.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from distrib_ft.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    DataError,
    _load,
    _messages,
    _record_error,
    _RecordError,
    _text,
)
from distrib_ft.runtime import dist
from distrib_ft.runtime.loss import drop_virtual_tokens

METRICS = ("exact_match", "contains", "regex", "multiple_choice")
_MC_HINT = "multiple-choice records need instruction (or question), choices (list of str) and answer (str or index)"


def normalize(text: str) -> str:
    """Strip, collapse runs of whitespace to one space, lower-case."""
    return " ".join(text.split()).casefold()


def is_correct(metric: str, generation: str, reference: str, pattern: str | None = None) -> bool:
    """Whether one generation (for ``multiple_choice``: the chosen choice) scores under ``metric``."""
    if metric == "exact_match":
        return normalize(generation) == normalize(reference)
    if metric == "contains":
        return normalize(reference) in normalize(generation)
    if metric == "regex":
        return re.search(pattern or reference, generation) is not None
    if metric == "multiple_choice":
        return generation == reference
    raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")


@torch.no_grad()
def score_generations(model, tokenizer, examples: list[dict], *, metric: str, max_new_tokens: int = 32,
                      batch_size: int = 8, pattern: str | None = None, device=None) -> dict:
    """Score ``examples`` under ``metric``; collective: every rank calls it with the same examples.

    Args:
        model: a Hugging Face causal LM, a peft model, or a DeepSpeed engine's ``module`` (ZeRO-3 too).
            Put in eval mode for the call; its previous mode is restored.
        tokenizer: the model's tokenizer (its pad token, else eos, fills the left padding).
        examples: ``{"prompt", "reference", "choices"}`` dicts (see the module docstring).
        metric: ``exact_match``, ``contains``, ``regex`` or ``multiple_choice``.
        max_new_tokens: generation length limit.
        batch_size: examples per ``generate`` (or, for multiple choice, per forward) call, per rank.
        pattern: the regular expression for ``regex`` (default: each example's reference).
        device: where inputs go (default: ``dist.device()``).

    Returns:
        ``{"score": correct / count, "correct": int, "count": int, "samples": [...]}``, the counts over
        all ranks; ``samples``: this rank's first 5 ``{"prompt", "generation", "reference"}`` (on rank 0,
        those of examples 0, world, 2 world, ...; for multiple choice the generation is the chosen choice).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if not examples:
        raise ValueError("no examples to score")
    for regex in ({pattern} if pattern else {e["reference"] for e in examples}) if metric == "regex" else ():
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"regex {regex!r} is not a valid regular expression: {e}") from None
    if metric == "multiple_choice":
        for i, e in enumerate(examples):
            if not e.get("choices") or e["reference"] not in e["choices"] or not all(e["choices"]):
                raise ValueError(f"example {i}: multiple_choice needs non-empty choices that include the reference")
    world = dist.world_size()
    device = device or dist.device()
    was_training = model.training
    model.eval()
    correct, count, samples = 0, 0, []
    try:
        for idx, run in dist.share_batches(len(examples), batch_size):
            batch = [examples[i] for i in run]  # no share left: a repeat, not counted
            if metric == "multiple_choice":
                outputs = _choose(model, tokenizer, batch, device)
            else:
                outputs = _generate(model, tokenizer, [e["prompt"] for e in batch], max_new_tokens, device,
                                    synced=world > 1)
            for e, out in zip(batch if idx else [], outputs):
                correct += is_correct(metric, out, e["reference"], pattern)
                count += 1
                if len(samples) < 5:
                    samples.append({"prompt": e["prompt"], "generation": out, "reference": e["reference"]})
    finally:
        model.train(was_training)
    correct, count = dist.all_reduce_sum([correct, count])
    return {"score": correct / max(count, 1), "correct": int(correct), "count": int(count), "samples": samples}


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt.

    A prompt that starts with the bos token (a chat template wrote it) is tokenized without adding special
    tokens; a plain prompt with the tokenizer's defaults.
    """
    bos = tokenizer.bos_token
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config_eos if isinstance(config_eos, list) else [] if config_eos is None else [config_eos]
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device, synced: bool) -> list[str]:
    """Greedy generations for a batch of prompts, decoded up to the first eos."""
    return [text for text, _ in generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, device=device,
                                               synced=synced)]


def generate_batch(model, tokenizer, prompts: list[str], *, max_new_tokens: int, device, synced: bool,
                   temperature: float = 0.0, top_p: float = 1.0) -> list[tuple[str, bool]]:
    """``(text, finished)`` per prompt (left-padded batch).

    ``text`` is the generation decoded up to the first eos, ``finished`` whether an eos ended it (False: cut at
    max_new_tokens). ``temperature`` 0 = greedy, else sampling with nucleus ``top_p`` from torch's global RNG.
    ``synced``: every rank calls together (ZeRO-3).
    """
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long, device=device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                         eos_token_id=eos, use_cache=True, synced_gpus=synced, **sampling)
    results = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        results.append((tokenizer.decode(row[:cut], skip_special_tokens=True), cut is not None))
    return results


def _choose(model, tokenizer, batch: list[dict], device) -> list[str]:
    """For each example, the choice with the highest summed log-likelihood given the prompt (one forward)."""
    seqs, spans = [], []  # spans: (row, first choice token position, end)
    for e in batch:
        prompt = encode_prompt(tokenizer, e["prompt"])
        for c in e["choices"]:
            cont = tokenizer(c, add_special_tokens=False)["input_ids"]
            spans.append((len(seqs), len(prompt), len(prompt) + len(cont)))
            seqs.append(prompt + cont)
    width = max(map(len, seqs))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], dtype=torch.long, device=device)
    logits = drop_virtual_tokens(model(input_ids=input_ids, attention_mask=mask).logits, input_ids)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    scores = [float(logprobs[r, s - 1:e - 1].gather(-1, input_ids[r, s:e, None]).sum()) for r, s, e in spans]
    starts = [sum(len(x["choices"]) for x in batch[:i]) for i in range(len(batch))]
    return [e["choices"][max(range(len(e["choices"])), key=lambda j: scores[k + j])] for e, k in zip(batch, starts)]


def examples_from_records(files: list[str], fmt: str, tokenizer, max_examples: int | None = None) -> list[dict]:
    """Build scoring examples from alpaca or chat records (JSON lines, Parquet or saved datasets).

    - alpaca: prompt = ``instruction`` (blank line, ``input``) as a user turn with the chat template and
      its generation prompt (the Stanford Alpaca prompt when the tokenizer has no template);
      reference = ``output``.
    - chat: prompt = every message before the last assistant turn, rendered with the generation
      prompt; reference = that assistant turn's content.
    - a record with ``choices`` (either format) is a multiple-choice item: prompt from ``instruction``
      or ``question`` (+ ``input``) as for alpaca; reference = ``answer`` (a choice, or its 0-based index).

    Args:
        files: ``.jsonl`` / ``.json`` / ``.parquet`` files or ``save_to_disk`` folders, read in order.
        fmt: ``alpaca`` or ``chat``.
        tokenizer: a Hugging Face tokenizer (chat needs a chat template).
        max_examples: keep the first this many (None: all).

    Raises:
        DataError: a missing or unreadable file, or a malformed record (naming the file and line).
    """
    if fmt not in ("alpaca", "chat"):
        raise DataError(f"{files[0] if files else '?'}: format {fmt!r}: generation metrics read alpaca or chat "
                        "records")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{files[0]}: format 'chat' needs a chat template but the tokenizer has none")
    examples = []
    for path in files:
        if not Path(path).exists():
            raise DataError(f"{path}: file not found")
        for index, record in enumerate(_load(path)):
            if max_examples is not None and len(examples) >= max_examples:
                return examples
            try:
                examples.append(_example(record, fmt, tokenizer))
            except _RecordError as e:
                e.index = index
                raise _record_error(path, fmt, e) from None
    if not examples:
        raise DataError(f"{', '.join(map(str, files))}: no records")
    return examples


def _example(record: dict, fmt: str, tokenizer) -> dict:
    if record.get("choices") is not None:
        return _choice_example(record, tokenizer)
    if fmt == "chat":
        messages = _messages(record)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return {"prompt": _render(tokenizer, messages[:last]), "reference": messages[last]["content"], "choices": None}
    return {"prompt": _user_prompt(tokenizer, _text(record, "instruction"), _text(record, "input", False)),
            "reference": _text(record, "output"), "choices": None}


def _choice_example(record: dict, tokenizer) -> dict:
    choices, answer = record["choices"], record.get("answer")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise _RecordError("choices", f"expected a list of at least 2 non-empty strings, got {choices!r:.60}")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # Arrow may store ints as floats
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise _RecordError("answer", f"index {answer} is outside choices (0..{len(choices) - 1})")
        answer = choices[answer]
    if answer not in choices:
        raise _RecordError("answer", f"missing ({_MC_HINT})" if answer is None
                           else f"{answer!r:.40} is neither one of the choices nor an index into them")
    name = "question" if record.get("instruction") is None and record.get("question") is not None else "instruction"
    if record.get(name) is None:
        raise _RecordError("instruction", f"missing ({_MC_HINT})")
    prompt = _user_prompt(tokenizer, _text(record, name), _text(record, "input", False))
    return {"prompt": prompt, "reference": answer, "choices": list(choices)}


def _user_prompt(tokenizer, instruction: str, inp: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        return (ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=inp)
    return _render(tokenizer, [{"role": "user", "content": instruction + ("\n\n" + inp if inp else "")}])


def _render(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own checks, e.g. "roles must alternate"
        raise _RecordError("messages", f"the chat template rejected the conversation: {e}") from None
