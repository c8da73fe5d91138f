"""Training data: JSONL / Parquet / saved ``datasets`` folders -> token ids and loss labels.

Each record becomes one example ``{"input_ids": [...], "labels": [...]}`` (equal lengths). A label of
``IGNORE_INDEX`` (-100) keeps a token out of the loss; the model shifts labels itself, so position 0
is never predicted. Formats (``fmt``):

- ``alpaca``: ``instruction`` (str), optional ``input`` (str, may be empty), ``output`` (str).
  ``prompt_template="chat"`` renders a user turn (instruction, blank line, input) and an assistant
  turn with the tokenizer's chat template; ``"alpaca"`` writes the Stanford Alpaca prompt, then
  ``output`` + eos; ``"auto"`` is chat when the tokenizer has a chat template, else alpaca.
- ``chat``: ``messages``, a list of ``{"role": system|user|assistant, "content": str}``, rendered
  with the tokenizer's chat template.
- ``text``: the string in ``text_field``, plus eos; every token is a target.
- ``tokenized``: ``input_ids`` and optional ``labels`` (same length, -100 allowed), used as they are.

Loss mask (alpaca, chat): only responses are targets. For assistant message i,
``render(messages[:i], add_generation_prompt=True)`` must be a prefix of ``render(messages[:i+1])``,
itself a prefix of the whole rendering; the characters in between, trailing whitespace cut, are the
response and the end-of-turn token (``<|im_end|>``). Every token whose character offsets overlap such
a span is a target. Chat-template text is tokenized with ``add_special_tokens=False`` (the template
holds them already); plain prompts (alpaca template, text) with the tokenizer's defaults.

Longer examples keep their first ``max_seq_length`` tokens (``DataStats.truncated``); an example
left without a target is dropped and counted in ``DataStats.skipped``. Packing concatenates the
(truncated) examples and cuts blocks of exactly ``max_seq_length``; the last partial block is dropped
and counted. A malformed record raises ``DataError``; it is never skipped.
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
from datasets import (
    DatasetDict,
    Features,
    IterableDataset,
    Sequence,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)

IGNORE_INDEX = -100
FORMATS = ("alpaca", "chat", "text", "tokenized")
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_HINTS = {"alpaca": "alpaca records need instruction, output and optionally input",
          "chat": "chat records need messages: a list of {role, content}",
          "text": "text records need the field named by text_field",
          "tokenized": "tokenized records need input_ids and optionally labels"}
_FEATURES = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                      "truncated": Value("bool"), "skip": Value("string")})


class DataError(ValueError):
    """A data problem in one line: the file, the record, the field, what is wrong and what to do.

    The record is ``line N`` (JSON lines, 1-based) or ``record N (0-based)`` (Parquet, saved datasets).
    """


@dataclass
class DataStats:
    """What preparing the data did.

    When streaming, the counts grow as the dataset is iterated (in the iterating process) and restart with each
    pass.
    """

    records: int = 0  # records read
    examples: int = 0  # examples produced (with packing: blocks)
    truncated: int = 0  # records cut to max_seq_length
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> examples (or packed blocks) dropped
    tokens: int = 0  # input tokens in the produced examples
    target_tokens: int = 0  # of those, tokens whose label is not -100
    max_seq_length: int = 0  # the length limit (for the summary)

    def summary(self) -> str:
        """One line for the log: ``412 records -> 412 examples, 53,211 tokens (31,004 targets); ...``."""
        reasons = ", ".join(f"{r}: {n:,}" for r, n in self.skipped.items())
        return (f"{self.records:,} records -> {self.examples:,} examples, {self.tokens:,} tokens "
                f"({self.target_tokens:,} targets); {self.truncated:,} truncated to {self.max_seq_length}; "
                f"skipped: {sum(self.skipped.values()):,}" + (f" ({reasons})" if reasons else ""))

    def merge(self, other: DataStats) -> DataStats:
        """The sum of two stats (e.g. of two files), as a new object."""
        return DataStats(self.records + other.records, self.examples + other.examples,
                         self.truncated + other.truncated, dict(Counter(self.skipped) + Counter(other.skipped)),
                         self.tokens + other.tokens, self.target_tokens + other.target_tokens,
                         max(self.max_seq_length, other.max_seq_length))


class _RecordError(Exception):
    """A malformed record; becomes a ``DataError`` once the file and line are known."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"field '{field_name}': {problem}")
        self.field_name, self.problem, self.index = field_name, problem, -1


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
        streaming: return an ``IterableDataset`` that reads and tokenizes while it is iterated.

    Returns:
        ``(dataset, stats)``: a ``datasets.Dataset`` with exactly the int columns ``input_ids`` and
        ``labels``, in file and record order (tokenization cached by ``datasets``), and its filled
        ``DataStats``. With ``streaming``: an ``IterableDataset`` of the same dicts (one shard) and a
        ``DataStats`` counted while it is iterated; its errors surface during iteration.

    Raises:
        DataError: a missing or unreadable file, a malformed record, or no example left.
    """
    from distrib_ft.runtime.storage import local_input

    files = [local_input(f) for f in files]  # URLs (s3://, gs://, hdfs://): downloaded once into the cache
    kwargs = dict(fmt=fmt, tokenizer=tokenizer, max_seq_length=max_seq_length, text_field=text_field,
                  prompt_template=_check_args(files, fmt, tokenizer, max_seq_length, prompt_template))
    if streaming:
        stats = DataStats(max_seq_length=max_seq_length)
        gen_kwargs = dict(files=tuple(files), stats=stats, packing=packing, kwargs=kwargs)  # a tuple is not sharded
        return IterableDataset.from_generator(_stream, gen_kwargs=gen_kwargs), stats

    stats, parts = DataStats(max_seq_length=max_seq_length), []
    for path in files:
        raw = _load(path)
        try:
            part = raw.map(_encode, with_indices=True, fn_kwargs=kwargs, remove_columns=raw.column_names,
                           features=_FEATURES, desc=f"tokenizing {Path(path).name}")
        except _RecordError as e:
            raise _record_error(path, fmt, e) from None
        except UnicodeDecodeError as e:  # Arrow keeps invalid UTF-8 in JSON strings until they are read
            raise _read_error(path, e) from e
        skip = list(part["skip"])
        stats = stats.merge(DataStats(records=len(raw), truncated=sum(part["truncated"]),
                                      skipped=dict(Counter(s for s in skip if s))))
        if any(skip):
            part = part.select([i for i, s in enumerate(skip) if not s])
        parts.append(part.select_columns(["input_ids", "labels"]))
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
        examples: dicts with ``input_ids`` and ``labels`` (equal-length lists or 1-D tensors).
        pad_token_id: the id written into padding (any valid id works: padding is masked).

    Returns:
        LongTensors of shape (B, T): ``input_ids`` (``pad_token_id`` on padding), ``attention_mask``
        (0 on padding) and ``labels`` (-100 on padding). When any example is a packed block (it has
        ``position_ids``), also ``position_ids``: the blocks' own, ``0..n-1`` for the other rows, and a new run
        from 0 on padding, so that the model's block-diagonal mask keeps every example (and the padding) apart.
    """
    shape = (len(examples), max(len(e["input_ids"]) for e in examples))
    batch = {"input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
             "attention_mask": torch.zeros(shape, dtype=torch.long),
             "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long)}
    packed = any("position_ids" in e for e in examples)
    if packed:
        batch["position_ids"] = torch.zeros(shape, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        batch["labels"][row, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        batch["attention_mask"][row, :n] = 1
        if packed:
            batch["position_ids"][row, :n] = torch.as_tensor(e["position_ids"], dtype=torch.long) \
                if "position_ids" in e else torch.arange(n)
            batch["position_ids"][row, n:] = torch.arange(shape[1] - n)
    return batch


def _check_args(files, fmt, tokenizer, max_seq_length, prompt_template) -> str:
    """Fail before reading anything; return the alpaca prompt template with ``auto`` resolved."""
    if not files:
        raise DataError("no data files given: list at least one .jsonl, .parquet or saved dataset folder")
    if fmt not in FORMATS or prompt_template not in ("auto", "chat", "alpaca") or max_seq_length < 2:
        raise DataError(f"{files[0]}: bad arguments fmt={fmt!r} (one of {', '.join(FORMATS)}), prompt_template="
                        f"{prompt_template!r} (auto, chat or alpaca), max_seq_length={max_seq_length} (at least 2)")
    for path in files:
        if not Path(path).exists():
            raise DataError(f"{path}: file not found")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    template = resolve_template(tokenizer, prompt_template)
    if (fmt == "chat" or (fmt == "alpaca" and template == "chat")) and not has_template:
        raise DataError(f"{files[0]}: format {fmt!r} needs a chat template but the tokenizer has none "
                        "(use a chat model's tokenizer, or format=alpaca with prompt_template=alpaca)")
    if fmt in ("alpaca", "chat") and not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{files[0]}: format {fmt!r} needs a fast tokenizer (character offsets for the loss mask)")
    return template


def resolve_template(tokenizer, prompt_template: str) -> str:
    """``auto`` -> ``chat`` when the tokenizer has a chat template, else ``alpaca``."""
    if prompt_template != "auto":
        return prompt_template
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def validate_record(record: dict, fmt: str, where: str, text_field: str = "text") -> None:
    """Check a record's fields for ``fmt`` without a tokenizer; DataError naming ``where`` and the field."""
    try:
        if fmt == "alpaca":
            _text(record, "instruction"), _text(record, "input", False), _text(record, "output")
        elif fmt == "chat":
            _messages(record)
        elif fmt == "text":
            _text(record, text_field)
        elif fmt == "tokenized":
            _token_ids(record, "input_ids", 2**31, allow_ignore=False)
        else:
            raise DataError(f"{where}: unknown data format {fmt!r} (one of {', '.join(FORMATS)})")
    except _RecordError as e:
        hint = f" ({_HINTS[fmt]})" if e.problem == "missing" else ""
        raise DataError(f"{where}: field '{e.field_name}': {e.problem}{hint}") from None


def encode_record(record: dict, fmt: str, where: str, *, tokenizer, max_seq_length: int, prompt_template: str,
                  text_field: str = "text") -> dict:
    """One record -> ``{"input_ids", "labels"}`` (truncated; possibly without targets), or DataError at ``where``."""
    try:
        ex = _encode(record, 0, fmt, tokenizer, max_seq_length, resolve_template(tokenizer, prompt_template),
                     text_field)
    except _RecordError as e:
        hint = f" ({_HINTS[fmt]})" if e.problem == "missing" else ""
        raise DataError(f"{where}: field '{e.field_name}': {e.problem}{hint}") from None
    return {"input_ids": ex["input_ids"], "labels": ex["labels"]}


def _load(path: str, streaming: bool = False):
    """Open one file or saved-dataset folder with ``datasets`` (lazily when streaming)."""
    p = Path(path)
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix.lower())
    if not p.is_dir() and builder is None:
        raise DataError(f"{path}: unsupported file type: use .jsonl, .json (JSON lines), .parquet or a "
                        "save_to_disk folder")
    try:
        if not p.is_dir():
            return load_dataset(builder, data_files=str(p), split="train", streaming=streaming)
        ds = load_from_disk(str(p))
    except Exception as e:
        raise _read_error(path, e) from e
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: the saved DatasetDict has no 'train' split (it has {', '.join(ds)})")
        ds = ds["train"]
    return ds


def _read_error(path: str, error: Exception) -> DataError:
    """Explain why a file could not be read; for JSON lines, name the first line that is not an object."""
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        empty = True
        with open(path, "rb") as f:
            for lineno, line in (x for x in enumerate(f, 1) if x[1].strip()):
                empty = False
                try:
                    if isinstance(json.loads(line), dict):
                        continue
                    problem = "not a JSON object: each line must be one JSON object"
                except UnicodeDecodeError as e:
                    problem = f"not UTF-8 text ({e.reason} at byte {e.start} of the line): save the file as UTF-8"
                except json.JSONDecodeError as e:
                    problem = f"invalid JSON ({e.msg} at column {e.colno}): each line must be one JSON object"
                return DataError(f"{path}: line {lineno}: {problem}")
        if empty:
            return DataError(f"{path}: no records (the file is empty)")
    cause = error.__cause__ or error
    return DataError(f"{path}: could not be read: {type(cause).__name__}: {cause}")


def _record_error(path: str, fmt: str, e: _RecordError) -> DataError:
    """Name the file and the line (JSON lines: the index-th non-blank line) or record of a bad record."""
    where = f"record {e.index} (0-based)"
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = (lineno for lineno, line in enumerate(f, 1) if line.strip())
            lineno = next((x for i, x in enumerate(lines) if i == e.index), None)
        where = f"line {lineno}" if lineno else where
    hint = f" ({_HINTS[fmt]})" if e.problem == "missing" else ""
    return DataError(f"{path}: {where}: field '{e.field_name}': {e.problem}{hint}")


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
            ids = labels = tokenizer(_text(record, text_field) + (tokenizer.eos_token or ""))["input_ids"]
        else:
            ids, labels = _mask(tokenizer, *_render(record, fmt, tokenizer, prompt_template))
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
    if value is None and required:
        raise _RecordError(name, "missing")
    if value is not None and not isinstance(value, str):
        raise _RecordError(name, f"expected a string, got {type(value).__name__} {value!r:.40}")
    return value or ""


def _token_ids(record: dict, name: str, vocab_size: int, allow_ignore: bool) -> list[int]:
    value = record.get(name)
    if not isinstance(value, list) or not value:
        raise _RecordError(name, "missing" if value is None else f"expected a non-empty list of ids, got {value!r:.40}")
    ids = [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]  # Arrow may store ints as floats
    for j, v in enumerate(ids):
        if not isinstance(v, int) or isinstance(v, bool):
            raise _RecordError(f"{name}[{j}]", f"expected an integer token id, got {v!r}")
        if not (0 <= v < vocab_size or (allow_ignore and v == IGNORE_INDEX)):
            raise _RecordError(f"{name}[{j}]", f"{v} is outside the tokenizer's vocabulary (0..{vocab_size - 1}"
                               + (" or -100)" if allow_ignore else ")"))
    return ids


def _messages(record: dict) -> list[dict]:
    value = record.get("messages")
    if not isinstance(value, list) or not value:
        raise _RecordError("messages", "missing" if value is None else f"expected a non-empty list of "
                           f"{{role, content}} objects, got {value!r:.40}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise _RecordError(f"messages[{j}]", f"expected a {{role, content}} object, got {m!r:.40}")
        try:
            out.append({"role": _text(m, "role"), "content": _text(m, "content")})
        except _RecordError as e:
            raise _RecordError(f"messages[{j}].{e.field_name}", e.problem) from None
        if out[-1]["role"] not in ROLES:
            raise _RecordError(f"messages[{j}].role", f"unknown role {m['role']!r}: use one of {', '.join(ROLES)}")
    if out[0]["role"] == "assistant" or not any(m["role"] == "assistant" for m in out):
        raise _RecordError("messages", "needs an assistant message after a user or system message (the targets)")
    return out


def _render(record: dict, fmt: str, tokenizer, prompt_template: str) -> tuple[str, list[tuple[int, int]], bool]:
    """An alpaca or chat record -> (text, target character spans, add_special_tokens)."""
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
    """Render a conversation; return the text and the character span of each assistant turn."""
    def render(msgs, generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # the template's own checks, e.g. "roles must alternate"
            raise _RecordError("messages", f"the chat template rejected the conversation: {e}") from None

    full, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prefix, upto = render(messages[:i], True), render(messages[: i + 1])
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise _RecordError(f"messages[{i}]", "the chat template is not prefix-stable (rendering up to "
                                   "this turn changes earlier text), so the response cannot be located: use "
                                   "format=tokenized with your own labels")
            spans.append((len(prefix), max(len(prefix), len(upto.rstrip()))))
    return _with_stop_tokens(tokenizer, full, spans)


def _with_stop_tokens(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    """Make every assistant span end with a token that stops generation.

    Most templates close a turn with an end-of-turn token inside the span (ChatML ``<|im_end|>``, Llama 3
    ``<|eot_id|>``, ``</s>``). Some close it with the next turn's role marker (GLM style): then that marker, the
    special token right after the span, becomes the target; after the last turn, where nothing follows, eos is
    appended. Without either the model would never learn to stop (trl PR #5988).

    Raises:
        _RecordError: a turn ends without a special token and the tokenizer has no eos to append.
    """
    added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    special = {*tokenizer.all_special_tokens, *added}
    special = sorted((t for t in special if t and t != tokenizer.pad_token), key=len, reverse=True)
    out = []
    for start, end in spans:
        if any(text[start:end].endswith(t) for t in special):
            out.append((start, end))
            continue
        after = len(text[end:]) - len(text[end:].lstrip())
        closer = next((t for t in special if text.startswith(t, end + after)), None)
        if closer is not None:
            out.append((start, end + after + len(closer)))
        elif end + after == len(text) and tokenizer.eos_token:
            text = text + tokenizer.eos_token
            out.append((start, len(text)))
        else:
            raise _RecordError("messages", "the chat template writes no end-of-turn token after an assistant turn "
                               "and the tokenizer has no eos: the model would not learn to stop; give the "
                               "tokenizer an eos token or use a template that closes turns")
    return text, out


def _mask(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool) -> tuple[list, list]:
    """Tokenize; a token is a target when its character offsets overlap a target span."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    labels = [t if any(s < end and e > start for start, end in spans) else IGNORE_INDEX
              for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


def _count_tokens(table: pa.Table) -> tuple[int, int]:
    """(tokens, target tokens) of an Arrow table with ``input_ids`` and ``labels`` list columns."""
    targets = pc.sum(pc.not_equal(pc.list_flatten(table["labels"]), IGNORE_INDEX)).as_py()
    return len(pc.list_flatten(table["input_ids"])), targets or 0


def _pack_table(table: pa.Table, block: int) -> pa.Table:
    """Concatenate all rows and cut rows of exactly ``block`` tokens (the remainder is dropped).

    Packed examples stay isolated: ``position_ids`` restart at 0 where each example starts (the model then
    attends within an example only: Hugging Face builds a block-diagonal causal mask from them, or uses
    flash-attn's varlen kernels), and an example's first token is never a target (it would be predicted
    from the example before it).
    """
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    ids = pc.list_flatten(table["input_ids"])
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    labels = pc.list_flatten(table["labels"]).to_numpy(zero_copy_only=False).copy()
    labels[positions == 0] = IGNORE_INDEX
    n = len(ids) // block
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * block, pa.int32())  # raises past 2**31 tokens

    def cut(values):
        values = values if isinstance(values, pa.Array) else pa.array(values, pa.int32())
        return pa.ListArray.from_arrays(offsets, values.slice(0, n * block))
    return pa.table({"input_ids": cut(ids), "labels": cut(labels), "position_ids": cut(positions)})


def _stream(files: tuple[str, ...], stats: DataStats, packing: bool, kwargs: dict):
    """The streaming generator: read, encode (and pack) lazily, counting into ``stats``."""
    vars(stats).update(vars(DataStats(max_seq_length=kwargs["max_seq_length"])))  # each pass counts anew
    examples = (ex for path in files for ex in _stream_file(path, stats, kwargs))
    for ex in _pack_stream(examples, kwargs["max_seq_length"], stats) if packing else examples:
        stats.examples += 1
        stats.tokens += len(ex["input_ids"])
        stats.target_tokens += sum(label != IGNORE_INDEX for label in ex["labels"])
        yield ex


def _stream_file(path: str, stats: DataStats, kwargs: dict):
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
    """:func:`_pack_table` for a stream: blocks of ``block`` tokens with isolating ``position_ids``."""
    ids, labels, positions = [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        ids, labels = ids + ex["input_ids"], labels + [IGNORE_INDEX] + ex["labels"][1:]
        positions += list(range(n))
        while len(ids) >= block:
            yield {"input_ids": ids[:block], "labels": labels[:block], "position_ids": positions[:block]}
            ids, labels, positions = ids[block:], labels[block:], positions[block:]
    if ids:
        stats.skipped[f"last partial block ({len(ids)} tokens) dropped by packing"] = 1
