"""distrib_ft.data.formats: formats, loss masks, errors that name file/line/field, truncation, packing, collate."""

import copy
import json
import re

import pytest
import torch
from datasets import Dataset, IterableDataset

from distrib_ft.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    DataError,
    DataStats,
    build_dataset,
    collate,
)

ALPACA = [{"instruction": "convert 12 km to m", "input": "", "output": "12 km = 12000 m"},
          {"instruction": "say hello", "input": "to the world", "output": "hello world"}]
CHAT = [{"messages": [{"role": "system", "content": "answer briefly"},
                      {"role": "user", "content": "question one"},
                      {"role": "assistant", "content": "answer one"},
                      {"role": "user", "content": "question two"},
                      {"role": "assistant", "content": "answer two"}]}]
LONG_PROMPT = {"instruction": "the quick brown fox " * 20, "input": "", "output": "yes"}
TEXT = [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "hello world"},
        {"text": "convert 12 km to m"}]


def write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def target_runs(tok, ex):
    """Decoded runs of consecutive target tokens (label != -100) of one example."""
    runs, current = [], []
    for token, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tok.decode(r) for r in runs + ([current] if current else [])]


def test_alpaca_chat_template_masks_the_response(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    ds, stats = build_dataset([path], "alpaca", tiny_tokenizer, 256, prompt_template="chat")
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 2
    for ex, rec in zip(ds, ALPACA):
        user = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
        rendered = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}], tokenize=False)
        assert tiny_tokenizer.decode(ex["input_ids"]) == rendered
        assert target_runs(tiny_tokenizer, ex) == [rec["output"] + "<|im_end|>"]
    assert stats.records == stats.examples == 2 and stats.truncated == 0 and stats.skipped == {}
    assert stats.tokens == sum(len(x) for x in ds["input_ids"])
    assert stats.target_tokens == sum(label != IGNORE_INDEX for x in ds["labels"] for label in x)


def test_alpaca_auto_follows_the_chat_template(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    auto, _ = build_dataset([path], "alpaca", tiny_tokenizer, 256)
    chat, _ = build_dataset([path], "alpaca", tiny_tokenizer, 256, prompt_template="chat")
    assert auto[:] == chat[:]
    plain_tok = copy.deepcopy(tiny_tokenizer)
    plain_tok.chat_template = None
    auto_plain, _ = build_dataset([path], "alpaca", plain_tok, 256)
    assert tiny_tokenizer.decode(auto_plain[0]["input_ids"]).startswith("Below is an instruction")


def test_alpaca_prompt_template(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    ds, _ = build_dataset([path], "alpaca", tiny_tokenizer, 256, prompt_template="alpaca")
    no_input = ALPACA_PROMPT_NO_INPUT.format(instruction=ALPACA[0]["instruction"])
    with_input = ALPACA_PROMPT.format(instruction=ALPACA[1]["instruction"], input=ALPACA[1]["input"])
    for ex, rec, prompt in zip(ds, ALPACA, [no_input, with_input]):
        assert tiny_tokenizer.decode(ex["input_ids"]) == prompt + rec["output"] + "<|im_end|>"
        assert target_runs(tiny_tokenizer, ex) == [rec["output"] + "<|im_end|>"]
    assert "### Input:\nto the world" in with_input and "### Input" not in no_input


def test_multi_turn_chat_masks_every_assistant_turn_only(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", CHAT)
    ds, stats = build_dataset([path], "chat", tiny_tokenizer, 256)
    ex = ds[0]
    assert tiny_tokenizer.decode(ex["input_ids"]) == tiny_tokenizer.apply_chat_template(CHAT[0]["messages"],
                                                                                        tokenize=False)
    assert target_runs(tiny_tokenizer, ex) == ["answer one<|im_end|>", "answer two<|im_end|>"]
    assert stats.examples == 1


def test_text_labels_are_the_inputs(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": r["text"]} for r in TEXT])
    ds, stats = build_dataset([path], "text", tiny_tokenizer, 256, text_field="body")
    for ex, rec in zip(ds, TEXT):
        assert ex["labels"] == ex["input_ids"]
        assert tiny_tokenizer.decode(ex["input_ids"]) == rec["text"] + "<|im_end|>"
    assert stats.target_tokens == stats.tokens


def test_tokenized_used_as_is(tmp_path, tiny_tokenizer):
    records = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]}]
    ds, stats = build_dataset([write_jsonl(tmp_path / "k.jsonl", records)], "tokenized", tiny_tokenizer, 16)
    assert ds[:] == {"input_ids": [[5, 6, 7, 8], [9, 10, 11]], "labels": [[5, 6, 7, 8], [-100, 10, 11]]}
    assert stats.tokens == 7 and stats.target_tokens == 6


def test_parquet_and_saved_dataset_inputs(tmp_path, tiny_tokenizer):
    reference, _ = build_dataset([write_jsonl(tmp_path / "c.jsonl", CHAT * 2)], "chat", tiny_tokenizer, 256)
    Dataset.from_list(CHAT * 2).to_parquet(str(tmp_path / "c.parquet"))
    Dataset.from_list(CHAT * 2).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "c.parquet", tmp_path / "saved"):
        ds, stats = build_dataset([str(path)], "chat", tiny_tokenizer, 256)
        assert ds[:] == reference[:] and stats.records == 2


def test_several_files_keep_order_and_sum_stats(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", TEXT[:1])
    b = write_jsonl(tmp_path / "b.jsonl", TEXT[1:])
    ds, stats = build_dataset([a, b], "text", tiny_tokenizer, 256)
    assert [tiny_tokenizer.decode(x) for x in ds["input_ids"]] == [r["text"] + "<|im_end|>" for r in TEXT]
    assert stats.records == stats.examples == 3


def test_malformed_json_names_the_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n\n" + '{"text": "oops",\n' + json.dumps(TEXT[1]) + "\n")
    for streaming in (False, True):
        with pytest.raises(DataError, match=r"bad\.jsonl: line 3: invalid JSON") as err:
            ds, _ = build_dataset([str(path)], "text", tiny_tokenizer, 64, streaming=streaming)
            list(ds)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("content,problem", [(b'[1, 2]\n', "line 2: not a JSON object"),
                                             ('{"text": "caf\xe9"}\n'.encode("latin-1"), "line 2: not UTF-8 text")])
def test_unreadable_lines_are_named(tmp_path, tiny_tokenizer, content, problem):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(TEXT[0]).encode() + b"\n" + content)
    for streaming in (False, True):
        with pytest.raises(DataError, match=re.escape(f"bad.jsonl: {problem}")):
            list(build_dataset([str(path)], "text", tiny_tokenizer, 64, streaming=streaming)[0])


def test_missing_field_names_file_line_and_field(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    expected = (f"{path}: line 3: field 'output': missing "
                "(alpaca records need instruction, output and optionally input)")
    with pytest.raises(DataError) as err:
        build_dataset([str(path)], "alpaca", tiny_tokenizer, 64)
    assert str(err.value) == expected
    with pytest.raises(DataError) as err:
        list(build_dataset([str(path)], "alpaca", tiny_tokenizer, 64, streaming=True)[0])
    assert str(err.value) == expected


@pytest.mark.parametrize("fmt,record,field", [
    ("alpaca", {"instruction": "x", "output": 5}, "output"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ("text", {"title": "x"}, "text"),
    ("tokenized", {"input_ids": "1 2 3"}, "input_ids"),
    ("tokenized", {"input_ids": [1, 99999]}, "input_ids[1]"),
    ("tokenized", {"input_ids": [1, 2], "labels": [1]}, "labels"),
])
def test_malformed_records_are_errors(tmp_path, tiny_tokenizer, fmt, record, field):
    path = write_jsonl(tmp_path / "r.jsonl", [record])
    with pytest.raises(DataError, match=re.escape(f"r.jsonl: line 1: field '{field}'")):
        build_dataset([path], fmt, tiny_tokenizer, 64)


def test_record_index_for_parquet(tmp_path, tiny_tokenizer):
    Dataset.from_list([ALPACA[0], {"instruction": "x", "input": "", "output": None}]).to_parquet(
        str(tmp_path / "a.parquet"))
    with pytest.raises(DataError, match=r"a\.parquet: record 1 \(0-based\): field 'output': missing"):
        build_dataset([str(tmp_path / "a.parquet")], "alpaca", tiny_tokenizer, 64)


def test_missing_file_and_missing_chat_template(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        build_dataset([str(tmp_path / "nope.jsonl")], "text", tiny_tokenizer, 64)
    plain_tok = copy.deepcopy(tiny_tokenizer)
    plain_tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        build_dataset([write_jsonl(tmp_path / "c.jsonl", CHAT)], "chat", plain_tok, 64)


def test_truncation_and_skipping_are_counted(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], LONG_PROMPT])
    ds, stats = build_dataset([path], "alpaca", tiny_tokenizer, 32)
    assert len(ds) == 1 and stats.records == 2 and stats.examples == 1
    assert stats.skipped == {"no target tokens after truncation": 1}
    assert "2 records -> 1 examples" in stats.summary() and "no target tokens after truncation: 1" in stats.summary()
    text_path = write_jsonl(tmp_path / "t.jsonl", TEXT)
    full_lengths = [len(x) for x in build_dataset([text_path], "text", tiny_tokenizer, 256)[0]["input_ids"]]
    ds, stats = build_dataset([text_path], "text", tiny_tokenizer, 8)
    assert [len(x) for x in ds["input_ids"]] == [min(n, 8) for n in full_lengths]
    assert stats.truncated == sum(n > 8 for n in full_lengths) > 0
    assert f"{stats.truncated} truncated to 8" in stats.summary()
    with pytest.raises(DataError, match="no training example left"):
        build_dataset([write_jsonl(tmp_path / "b.jsonl", [LONG_PROMPT])], "alpaca", tiny_tokenizer, 32)


def test_packing_cuts_exact_blocks_with_aligned_labels(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA * 3)
    plain, _ = build_dataset([path], "alpaca", tiny_tokenizer, 256)
    block = max(len(x) for x in plain["input_ids"]) + 3  # no example is truncated
    packed, stats = build_dataset([path], "alpaca", tiny_tokenizer, block, packing=True)
    all_ids = [t for x in plain["input_ids"] for t in x]
    all_labels = [t for x in plain["labels"] for t in x]
    assert len(packed) == len(all_ids) // block == stats.examples > 1 and len(all_ids) % block
    assert all(len(x) == block for x in list(packed["input_ids"]) + list(packed["labels"]))
    assert [t for x in packed["input_ids"] for t in x] == all_ids[: len(packed) * block]
    assert [t for x in packed["labels"] for t in x] == all_labels[: len(packed) * block]
    assert stats.skipped == {f"last partial block ({len(all_ids) % block} tokens) dropped by packing": 1}
    assert stats.tokens == len(packed) * block and stats.truncated == 0


@pytest.mark.parametrize("fmt,records,max_len,packing", [
    ("chat", CHAT * 3, 256, False), ("alpaca", ALPACA * 3, 40, True), ("text", TEXT, 8, False),
    ("alpaca", [ALPACA[0], LONG_PROMPT, ALPACA[1]], 40, False),
])
def test_streaming_yields_the_same_examples(tmp_path, tiny_tokenizer, fmt, records, max_len, packing):
    path = write_jsonl(tmp_path / "s.jsonl", records)
    ds, stats = build_dataset([path], fmt, tiny_tokenizer, max_len, packing=packing)
    stream, stream_stats = build_dataset([path], fmt, tiny_tokenizer, max_len, packing=packing, streaming=True)
    assert isinstance(stream, IterableDataset)
    assert list(stream) == list(ds)
    assert stream_stats == stats
    list(stream)  # a second pass counts anew
    assert stream_stats == stats


def test_collate_pads_right():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}],
                    pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())


def test_stats_merge_and_summary():
    a = DataStats(records=2, examples=2, truncated=1, skipped={"x": 1}, tokens=1000, target_tokens=10,
                  max_seq_length=512)
    b = DataStats(records=3, examples=1, skipped={"x": 2, "y": 1}, tokens=5, target_tokens=2, max_seq_length=512)
    merged = a.merge(b)
    assert (merged.records, merged.examples, merged.truncated, merged.skipped) == (5, 3, 1, {"x": 3, "y": 1})
    assert merged.summary() == ("5 records -> 3 examples, 1,005 tokens (12 targets); 1 truncated to 512; "
                                "skipped: 4 (x: 3, y: 1)")
