"""Training data: JSONL / Parquet / saved ``datasets`` folders -> token ids and loss labels.

Every record becomes one example ``{"input_ids": [...], "labels": [...]}`` of equal lengths. A label
of ``IGNORE_INDEX`` (-100) takes a token out of the loss; the model shifts labels by one itself, so
position 0 is never predicted.

Formats (``fmt``):

- ``alpaca``: ``instruction`` (str), optional ``input`` (str, may be empty), ``output`` (str).
  ``prompt_template="chat"`` renders it as a user turn (instruction + blank line + input) and an
  assistant turn with the tokenizer's chat template; ``"alpaca"`` uses the Stanford Alpaca prompt
  followed by ``output`` + eos; ``"auto"`` picks chat when the tokenizer has a chat template.
- ``chat``: ``messages``, a list of ``{"role": system|user|assistant, "content": str}``, rendered
  with the tokenizer's chat template.
- ``text``: the string in ``text_field`` plus eos; every token is a target.
- ``tokenized``: ``input_ids`` and optional ``labels`` (same length, -100 allowed), used as they are.

Loss mask (alpaca, chat): only response tokens are targets. For assistant message i the text of
``render(messages[:i], add_generation_prompt=True)`` must be a prefix of ``render(messages[:i+1])``,
which must be a prefix of the whole rendering; the characters between the two (trailing whitespace
cut) are the response plus the template's end-of-turn token. Tokens whose character offsets overlap
such a span are targets, every assistant turn included. Chat-template text is tokenized with
``add_special_tokens=False`` (the template already holds them); plain prompts (alpaca, text) with the
tokenizer's defaults.

Examples longer than ``max_seq_length`` keep their beginning (counted in ``DataStats.truncated``);
an example left without a target token is dropped and counted in ``DataStats.skipped``. Packing
concatenates the examples and cuts blocks of exactly ``max_seq_length``; the last partial block is
dropped and counted. A malformed record is an error (``DataError``), never skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import (Dataset, DatasetDict, Features, IterableDataset, Sequence, Value, concatenate_datasets,
                      load_dataset, load_from_disk)

IGNORE_INDEX = -100
FORMATS = ("alpaca", "chat", "text", "tokenized")
PROMPT_TEMPLATES = ("auto", "chat", "alpaca")
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_HINTS = {"alpaca": "alpaca records need instruction, output and optionally input",
          "chat": "chat records need messages: a list of {role, content}",
          "text": "text records need the text field",
          "tokenized": "tokenized records need input_ids and optionally labels"}
_FEATURES = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                      "truncated": Value("bool"), "skip": Value("string")})


class DataError(ValueError):
    """A data problem, in one line: file, ``line N`` (JSON lines, 1-based) or ``record N (0-based)``
    (Parquet, saved datasets), the field, what is wrong and what to do."""


@dataclass
class DataStats:
    """What preparing the data did. In streaming mode the counts grow while the dataset is iterated
    (in the iterating process) and start again at each pass.

    Attributes:
        records: records read.
        examples: examples produced (after packing: blocks).
        truncated: records cut to ``max_seq_length``.
        skipped: reason -> number of examples (or packed blocks) dropped.
        tokens: input tokens in the produced examples.
        target_tokens: tokens in the produced examples whose label is not -100.
        max_seq_length: the length limit used (for the summary).
    """

    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    target_tokens: int = 0
    max_seq_length: int = 0

    def summary(self) -> str:
        """One line for the log, e.g. ``412 records -> 412 examples, 53,211 tokens (31,004 targets); ...``."""
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{r}: {n:,}" for r, n in self.skipped.items())
        return (f"{self.records:,} records -> {self.examples:,} examples, {self.tokens:,} tokens "
                f"({self.target_tokens:,} targets); {self.truncated:,} truncated to {self.max_seq_length}; "
                f"skipped: {skipped:,}" + (f" ({reasons})" if reasons else ""))

    def merge(self, other: DataStats) -> DataStats:
        """The sum of two stats (e.g. of two files), as a new object."""
        return DataStats(self.records + other.records, self.examples + other.examples,
                         self.truncated + other.truncated, dict(Counter(self.skipped) + Counter(other.skipped)),
                         self.tokens + other.tokens, self.target_tokens + other.target_tokens,
                         max(self.max_seq_length, other.max_seq_length))


class _RecordError(Exception):
    """A malformed record; ``build_dataset`` turns it into a ``DataError`` with the file and line."""

    def __init__(self, field_name: str, problem: str, index: int = -1):
        super().__init__(f"field '{field_name}': {problem}")
        self.field_name, self.problem, self.index = field_name, problem, index


def build_dataset(files: list[str], fmt: str, tokenizer, max_seq_length: int, packing: bool = False,
                  prompt_template: str = "auto", text_field: str = "text", streaming: bool = False):
    """Load, validate and tokenize training files.

    Args:
        files: ``.jsonl`` / ``.json`` (JSON lines), ``.parquet`` files or ``save_to_disk`` folders.
        fmt: ``alpaca``, ``chat``, ``text`` or ``tokenized`` (see the module docstring).
        tokenizer: a Hugging Face tokenizer; alpaca and chat need a fast one (character offsets).
        max_seq_length: longer examples are truncated; with packing, the block length.
        packing: concatenate examples into blocks of exactly ``max_seq_length`` tokens.
        prompt_template: how alpaca records are rendered: ``auto``, ``chat`` or ``alpaca``.
        text_field: the field holding the text for ``fmt="text"``.
        streaming: return an ``IterableDataset`` that tokenizes while it is iterated.

    Returns:
        ``(dataset, stats)``: a ``datasets.Dataset`` with exactly the int columns ``input_ids`` and
        ``labels``, in file and record order, and its filled ``DataStats``; with ``streaming`` an
        ``IterableDataset`` of the same dicts and a ``DataStats`` counted while it is iterated.

    Raises:
        DataError: a missing or unreadable file, a malformed record, or no example left.
    """
    template = _check_args(files, fmt, tokenizer, max_seq_length, prompt_template)
    kwargs = dict(fmt=fmt, tokenizer=tokenizer, max_seq_length=max_seq_length, prompt_template=template,
                  text_field=text_field)
    for path in files:
        if not Path(path).exists():
            raise DataError(f"{path}: file not found")
    if streaming:
        stats = DataStats(max_seq_length=max_seq_length)
        gen_kwargs = dict(files=tuple(files), stats=stats, packing=packing, kwargs=kwargs)  # tuple: one shard
        return IterableDataset.from_generator(_stream, gen_kwargs=gen_kwargs), stats

    stats, parts = DataStats(max_seq_length=max_seq_length), []
    for path in files:
        part, part_stats = _encode_file(path, kwargs)
        parts.append(part)
        stats = stats.merge(part_stats)
    ds = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if packing and len(ds):
        rest = _count_tokens(ds.with_format("arrow")[:])[0] % max_seq_length
        ds = ds.with_format("arrow").map(_pack_table, batched=True, batch_size=None, remove_columns=ds.column_names,
                                         fn_kwargs={"block": max_seq_length}, desc="packing").with_format(None)
        if rest:
            stats.skipped[f"last partial block ({rest} tokens) dropped by packing"] = 1
    stats.examples = len(ds)
    if not stats.examples:
        raise DataError(f"{', '.join(map(str, files))}: no training example left: {stats.summary()}")
    stats.tokens, stats.target_tokens = _count_tokens(ds.with_format("arrow")[:])
    return ds, stats


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Args:
        examples: dicts with ``input_ids`` and ``labels`` (lists or 1-D tensors of equal length).
        pad_token_id: id written into padding (any valid id: padding is masked).

    Returns:
        LongTensors of shape (B, T): ``input_ids`` (padding: ``pad_token_id``), ``attention_mask``
        (0 on padding) and ``labels`` (-100 on padding).
    """
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _check_args(files, fmt, tokenizer, max_seq_length, prompt_template) -> str:
    """Check the arguments; return the alpaca prompt template with ``auto`` resolved."""
    where = files[0] if files else "(no files)"
    if not files:
        raise DataError("no data files given: list at least one .jsonl, .parquet or saved dataset folder")
    if fmt not in FORMATS:
        raise DataError(f"{where}: unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if prompt_template not in PROMPT_TEMPLATES:
        raise DataError(f"{where}: unknown prompt_template {prompt_template!r}: use one of {', '.join(PROMPT_TEMPLATES)}")
    if max_seq_length < 2:
        raise DataError(f"{where}: max_seq_length must be at least 2, got {max_seq_length}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    template = ("chat" if has_template else "alpaca") if prompt_template == "auto" else prompt_template
    if (fmt == "chat" or (fmt == "alpaca" and template == "chat")) and not has_template:
        raise DataError(f"{where}: format {fmt!r} needs a chat template but the tokenizer has none "
                        "(use a chat model's tokenizer, or format=alpaca with prompt_template=alpaca)")
    if fmt in ("alpaca", "chat") and not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: format {fmt!r} needs a fast tokenizer (character offsets for the loss mask)")
    return template


def _load(path: str, streaming: bool = False):
    """Read one file or saved-dataset folder with ``datasets``; ``DataError`` when it cannot."""
    p = Path(path)
    try:
        if p.is_dir():
            ds = load_from_disk(str(p))
            if isinstance(ds, DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: saved DatasetDict has no 'train' split (has {', '.join(ds)})")
                ds = ds["train"]
            return ds
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type: use .jsonl, .json, .parquet or a save_to_disk folder")
        return load_dataset(builder, data_files=str(p), split="train", streaming=streaming)
    except DataError:
        raise
    except Exception as e:
        raise _read_error(path, e) from e


def _read_error(path: str, error: Exception) -> DataError:
    """Explain why ``datasets`` could not read a file; for JSON, find the first bad line."""
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        problem = _json_problem(path)
        if problem:
            return DataError(f"{path}: {problem}")
    cause = error.__cause__ or error
    return DataError(f"{path}: could not be read: {type(cause).__name__}: {cause}")


def _is_json_array(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(4096).lstrip().startswith("[")


def _json_problem(path: str) -> str | None:
    """``"line N: invalid JSON (...)"`` for the first bad line (blank lines are fine), or None."""
    try:
        with open(path, encoding="utf-8") as f:
            if _is_json_array(path):
                json.load(f)
                return None
            empty = True
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    empty = False
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"line {lineno}: invalid JSON ({e.msg} at column {e.colno}): fix or remove the line"
            return "no records (the file is empty)" if empty else None
    except json.JSONDecodeError as e:
        return f"line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason} at byte {e.start})"


def _where(path: str, index: int) -> str:
    """``line N`` (1-based, blank lines counted) for JSON lines files, else ``record N (0-based)``."""
    if Path(path).suffix.lower() in (".jsonl", ".json") and not _is_json_array(path):
        seen = -1
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                seen += bool(line.strip())
                if seen == index:
                    return f"line {lineno}"
    return f"record {index} (0-based)"


def _record_error(path: str, fmt: str, e: _RecordError) -> DataError:
    problem = e.problem + (f" ({_HINTS[fmt]})" if e.problem == "missing" else "")
    return DataError(f"{path}: {_where(path, e.index)}: field '{e.field_name}': {problem}")


def _encode_file(path: str, kwargs: dict) -> tuple[Dataset, DataStats]:
    """Tokenize one file with ``Dataset.map`` (cached by ``datasets``); count truncated and skipped."""
    raw = _load(path)
    try:
        mapped = raw.map(_encode, with_indices=True, fn_kwargs=kwargs, remove_columns=raw.column_names,
                         features=_FEATURES, desc=f"tokenizing {Path(path).name}")
    except _RecordError as e:
        raise _record_error(path, kwargs["fmt"], e) from None
    skip = list(mapped["skip"])
    stats = DataStats(records=len(raw), truncated=sum(mapped["truncated"]),
                      skipped=dict(Counter(s for s in skip if s)), max_seq_length=kwargs["max_seq_length"])
    if stats.skipped:
        mapped = mapped.select([i for i, s in enumerate(skip) if not s])
    return mapped.select_columns(["input_ids", "labels"]), stats


def _encode(record: dict, index: int, fmt: str, tokenizer, max_seq_length: int, prompt_template: str,
            text_field: str) -> dict:
    """One record -> ``{"input_ids", "labels", "truncated", "skip"}``; ``skip`` is "" or the reason."""
    try:
        if fmt == "tokenized":
            ids = _token_ids(record, "input_ids", len(tokenizer), allow_ignore=False)
            labels = ids if record.get("labels") is None else _token_ids(record, "labels", len(tokenizer), True)
            if len(labels) != len(ids):
                raise _RecordError("labels", f"has {len(labels)} entries but input_ids has {len(ids)}")
        elif fmt == "text":
            text = _text(record, text_field) + (tokenizer.eos_token or "")
            ids = labels = tokenizer(text)["input_ids"]
        else:
            text, spans, add_special = _render(record, fmt, tokenizer, prompt_template)
            ids, labels = _mask(tokenizer, text, spans, add_special)
    except _RecordError as e:
        e.index = index
        raise
    truncated = len(ids) > max_seq_length
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    skip = ""
    if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never predicted
        skip = "no target tokens after truncation" if truncated else "no target tokens"
    return {"input_ids": list(ids), "labels": list(labels), "truncated": truncated, "skip": skip}


def _text(record: dict, name: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if value is None:
        raise _RecordError(name, "missing")
    if not isinstance(value, str):
        raise _RecordError(name, f"expected a string, got {type(value).__name__} {value!r:.40}")
    return value


def _token_ids(record: dict, name: str, vocab_size: int, allow_ignore: bool) -> list[int]:
    value = record.get(name)
    if value is None:
        raise _RecordError(name, "missing")
    if not isinstance(value, list) or not value:
        raise _RecordError(name, f"expected a non-empty list of token ids, got {value!r:.40}")
    ids = []
    for j, v in enumerate(value):
        if isinstance(v, float) and v.is_integer():  # Arrow stores a column as floats if any row has one
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise _RecordError(f"{name}[{j}]", f"expected an integer token id, got {v!r}")
        if not (0 <= v < vocab_size or (allow_ignore and v == IGNORE_INDEX)):
            raise _RecordError(f"{name}[{j}]", f"{v} is outside the tokenizer's vocabulary (0..{vocab_size - 1})"
                               + (" or -100" if allow_ignore else ""))
        ids.append(v)
    return ids


def _messages(record: dict) -> list[dict]:
    value = record.get("messages")
    if value is None:
        raise _RecordError("messages", "missing")
    if not isinstance(value, list) or not value:
        raise _RecordError("messages", f"expected a non-empty list of {{role, content}}, got {value!r:.40}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise _RecordError(f"messages[{j}]", f"expected a {{role, content}} object, got {m!r:.40}")
        try:
            role, content = _text(m, "role"), _text(m, "content")
        except _RecordError as e:
            raise _RecordError(f"messages[{j}].{e.field_name}", e.problem) from None
        if role not in ROLES:
            raise _RecordError(f"messages[{j}].role", f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _RecordError("messages", "no assistant message: nothing to learn from")
    if out[0]["role"] == "assistant":
        raise _RecordError("messages[0].role", "the conversation starts with assistant: put a user message first")
    return out


def _render(record: dict, fmt: str, tokenizer, prompt_template: str) -> tuple[str, list[tuple[int, int]], bool]:
    """Alpaca or chat record -> (text, target character spans, add_special_tokens)."""
    if fmt == "chat":
        return (*_chat_spans(tokenizer, _messages(record)), False)
    instruction, inp, output = _text(record, "instruction"), _text(record, "input", False), _text(record, "output")
    if prompt_template == "chat":
        user = instruction + ("\n\n" + inp if inp else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return (*_chat_spans(tokenizer, messages), False)
    prompt = (ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=inp)
    text = prompt + output + (tokenizer.eos_token or "")
    return text, [(len(prompt), len(text))], True


def _chat_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return it and the character span of each assistant turn."""
    def render(msgs, generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja errors, e.g. "roles must alternate"
            raise _RecordError("messages", f"the chat template rejected the conversation: {e}") from None

    full, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prefix, upto = render(messages[:i], True), render(messages[: i + 1])
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise _RecordError(f"messages[{i}]", "the chat template is not prefix-stable (rendering the "
                                   "conversation up to this turn changes earlier text), so the response "
                                   "tokens cannot be located: use format=text or pre-tokenize")
            spans.append((len(prefix), max(len(prefix), len(upto.rstrip()))))
    return full, spans


def _mask(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool) -> tuple[list, list]:
    """Tokenize; a token is a target when its character span overlaps a target span."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(s < end and e > start for start, end in spans) else IGNORE_INDEX
              for t, (s, e) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _count_tokens(table: pa.Table) -> tuple[int, int]:
    """(tokens, target tokens) of an Arrow table with ``input_ids`` and ``labels`` columns."""
    tokens = len(pc.list_flatten(table["input_ids"]))
    targets = pc.sum(pc.not_equal(pc.list_flatten(table["labels"]), IGNORE_INDEX)).as_py() or 0
    return tokens, targets


def _pack_table(table: pa.Table, block: int) -> pa.Table:
    """Concatenate all rows and cut them into rows of exactly ``block`` tokens (remainder dropped)."""
    ids, labels = pc.list_flatten(table["input_ids"]), pc.list_flatten(table["labels"])
    n = len(ids) // block
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * block)
    def cut(values):
        return pa.ListArray.from_arrays(offsets, values.slice(0, n * block).combine_chunks())
    return pa.table({"input_ids": cut(ids), "labels": cut(labels)})


def _stream(files: tuple[str, ...], stats: DataStats, packing: bool, kwargs: dict):
    """The streaming generator: encode records lazily (and pack); update ``stats`` as it goes."""
    vars(stats).update(vars(DataStats(max_seq_length=kwargs["max_seq_length"])))  # a new pass starts anew
    examples = _stream_examples(files, stats, kwargs)
    for ex in _pack_stream(examples, kwargs["max_seq_length"], stats) if packing else examples:
        stats.examples += 1
        stats.tokens += len(ex["input_ids"])
        stats.target_tokens += sum(label != IGNORE_INDEX for label in ex["labels"])
        yield ex


def _stream_examples(files, stats: DataStats, kwargs: dict):
    for path in files:
        try:
            for index, record in enumerate(_load(path, streaming=True)):
                try:
                    ex = _encode(record, index, **kwargs)
                except _RecordError as e:
                    raise _record_error(path, kwargs["fmt"], e) from None
                stats.records += 1
                stats.truncated += ex["truncated"]
                if ex["skip"]:
                    stats.skipped[ex["skip"]] = stats.skipped.get(ex["skip"], 0) + 1
                else:
                    yield {"input_ids": ex["input_ids"], "labels": ex["labels"]}
        except DataError:
            raise
        except Exception as e:  # the JSON reader fails while iterating
            raise _read_error(path, e) from e


def _pack_stream(examples, block: int, stats: DataStats):
    ids, labels = [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
        while len(ids) >= block:
            yield {"input_ids": ids[:block], "labels": labels[:block]}
            ids, labels = ids[block:], labels[block:]
    if ids:
        stats.skipped[f"last partial block ({len(ids)} tokens) dropped by packing"] = 1
