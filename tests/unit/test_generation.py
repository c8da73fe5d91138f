"""Generation-based retention metrics on a tiny random model: each metric on cases whose answer is
known from the model itself (its own greedy generation, its own most likely choice)."""

import json
import re

import pytest
import torch

from distrib_ft.data.formats import DataError
from distrib_ft.monitor.generation import examples_from_records, is_correct, normalize, score_generations

NEW = 8  # max_new_tokens: short keeps the tests fast
CONTENTS = ["hello", "convert 3 km to m", "the quick brown fox jumps over the lazy dog, then", "a", "question 7"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                               add_generation_prompt=True) for c in CONTENTS]


@pytest.fixture(scope="module")
def greedy(model, tiny_tokenizer, prompts):
    """Each prompt's greedy continuation, generated alone (no padding), decoded."""
    out = []
    for p in prompts:
        ids = tiny_tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, do_sample=False, max_new_tokens=NEW, pad_token_id=tiny_tokenizer.pad_token_id)
        out.append(tiny_tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    assert len(set(out)) > 1, "the tiny model should not answer every prompt alike"
    return out


def _examples(prompts, references, choices=None):
    return [{"prompt": p, "reference": r, "choices": choices[i] if choices else None}
            for i, (p, r) in enumerate(zip(prompts, references))]


def test_normalize_and_is_correct():
    assert normalize("  Paris\n is   THE capital ") == "paris is the capital"
    assert is_correct("exact_match", " paris  ", "Paris")
    assert is_correct("contains", "I think PARIS.", "paris") and not is_correct("contains", "Lyon", "paris")
    assert is_correct("regex", "answer: 42", "unused", pattern=r"\b42\b") and not is_correct("regex", "4", r"\d\d")
    with pytest.raises(ValueError, match="unknown metric"):
        is_correct("bleu", "a", "b")


def test_exact_match_own_generation(model, tiny_tokenizer, prompts, greedy):
    refs = [g.upper() + "  " if i % 2 else g for i, g in enumerate(greedy)]  # normalisation: case, whitespace
    res = score_generations(model, tiny_tokenizer, _examples(prompts, refs), metric="exact_match",
                            max_new_tokens=NEW, batch_size=3)
    assert (res["correct"], res["count"], res["score"]) == (5, 5, 1.0)
    assert [s["generation"] for s in res["samples"]] == greedy
    wrong = score_generations(model, tiny_tokenizer, _examples(prompts, ["no such answer"] * 5),
                              metric="exact_match", max_new_tokens=NEW)
    assert (wrong["correct"], wrong["count"], wrong["score"]) == (0, 5, 0.0)


def test_left_padding_matches_one_by_one(model, tiny_tokenizer, prompts, greedy):
    assert len({len(tiny_tokenizer(p)["input_ids"]) for p in prompts}) > 2  # the batch really is padded
    for batch_size in (1, 5):
        res = score_generations(model, tiny_tokenizer, _examples(prompts, greedy), metric="exact_match",
                                max_new_tokens=NEW, batch_size=batch_size)
        assert [s["generation"] for s in res["samples"]] == greedy
    assert tiny_tokenizer.padding_side == "right"  # untouched


def test_contains_and_regex(model, tiny_tokenizer, prompts, greedy):
    refs = [g[1:4] for g in greedy[:3]] + ["zzz never", "qqq never"]
    res = score_generations(model, tiny_tokenizer, _examples(prompts, refs), metric="contains", max_new_tokens=NEW)
    assert (res["correct"], res["count"]) == (3, 5)

    refs = ["^" + re.escape(greedy[0][:3]), re.escape(greedy[1][-2:]) + "$", "^NOPE$", "x{50}", "."]
    res = score_generations(model, tiny_tokenizer, _examples(prompts, refs), metric="regex", max_new_tokens=NEW)
    assert (res["correct"], res["count"]) == (3, 5)
    one = score_generations(model, tiny_tokenizer, _examples(prompts, ["unused"] * 5), metric="regex",
                            max_new_tokens=NEW, pattern="^" + re.escape(greedy[0][:2]))
    assert one["correct"] == sum(g.startswith(greedy[0][:2]) for g in greedy)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        score_generations(model, tiny_tokenizer, _examples(prompts, ["("] * 5), metric="regex")


@torch.no_grad()
def _choice_logprob(model, tokenizer, prompt, choice) -> float:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(choice, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([p + c])).logits[0].float().log_softmax(-1)
    return sum(float(logits[len(p) - 1 + j, t]) for j, t in enumerate(c))


def test_multiple_choice_picks_most_likely(model, tiny_tokenizer, prompts):
    choices = [[" yes", " no", " maybe so"], [" 3000 m", " 30 m"], [" dog", " cat", " fox", " x"],
               [" b", " c"], [" 7", " seven", " answer"]]
    scores = [[_choice_logprob(model, tiny_tokenizer, p, c) for c in cs] for p, cs in zip(prompts, choices)]
    best = [cs[max(range(len(cs)), key=s.__getitem__)] for cs, s in zip(choices, scores)]
    worst = [cs[min(range(len(cs)), key=s.__getitem__)] for cs, s in zip(choices, scores)]
    for batch_size in (2, 8):
        res = score_generations(model, tiny_tokenizer, _examples(prompts, best, choices), metric="multiple_choice",
                                batch_size=batch_size)
        assert (res["correct"], res["count"]) == (5, 5)
        assert [s["generation"] for s in res["samples"]] == best
    res = score_generations(model, tiny_tokenizer, _examples(prompts, worst, choices), metric="multiple_choice")
    assert res["correct"] == 0
    with pytest.raises(ValueError, match="include the reference"):
        score_generations(model, tiny_tokenizer, _examples(prompts, ["nope"] * 5, choices), metric="multiple_choice")


def test_stops_at_eos_and_restores_mode(model, tiny_tokenizer, prompts, monkeypatch):
    tok = tiny_tokenizer
    word = tok(" fox", add_special_tokens=False)["input_ids"]
    tail = word + [tok.eos_token_id] + word + [tok.pad_token_id]

    def fake_generate(input_ids, attention_mask, **kwargs):
        assert kwargs["do_sample"] is False and kwargs["synced_gpus"] is False
        assert attention_mask[:, -1].all() and not attention_mask[:, 0].all()  # left padding
        return torch.cat([input_ids, torch.tensor([tail] * len(input_ids))], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    model.train()
    try:
        res = score_generations(model, tok, _examples(prompts[:2], ["fox", "fox"]), metric="exact_match")
        assert model.training
    finally:
        model.eval()
    assert res["correct"] == 2 and res["samples"][0]["generation"] == " fox"


def test_peft_model(model, tiny_tokenizer, prompts, greedy):
    import copy

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    res = score_generations(lora, tiny_tokenizer, _examples(prompts, greedy), metric="exact_match",
                            max_new_tokens=NEW)
    assert res["correct"] == 5  # LoRA's B starts at zero: same outputs as the base model


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_examples_from_records(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    alpaca = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "convert 3 km to m", "input": "", "output": "3000 m"},
                                                 {"instruction": "add", "input": "2 and 3", "output": "5"}])
    ex = examples_from_records([alpaca], "alpaca", tok, max_examples=None)
    assert ex[0] == {"prompt": "<|im_start|>user\nconvert 3 km to m<|im_end|>\n<|im_start|>assistant\n",
                     "reference": "3000 m", "choices": None}
    assert ex[1]["prompt"].startswith("<|im_start|>user\nadd\n\n2 and 3<|im_end|>")
    chat = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]}])
    (ex,) = examples_from_records([chat], "chat", tok)
    assert ex["reference"] == "4" and ex["prompt"].endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nhello<|im_end|>" in ex["prompt"]

    import pandas as pd

    mc = tmp_path / "mc.parquet"
    pd.DataFrame([{"question": "capital of France?", "choices": [" Paris", " Rome"], "answer": 0},
                  {"question": "2+2?", "choices": [" 3", " 4"], "answer": 1}]).to_parquet(mc)
    ex = examples_from_records([str(mc), alpaca], "alpaca", tok, max_examples=3)
    assert [e["reference"] for e in ex] == [" Paris", " 4", "3000 m"]
    assert ex[0]["choices"] == [" Paris", " Rome"] and "capital of France?" in ex[0]["prompt"]


@pytest.mark.parametrize("row, match", [
    ({"instruction": "x"}, r"line 2: field 'output': missing"),
    ({"question": "q", "choices": ["a", "b"], "answer": 5}, r"line 2: field 'answer': index 5 is outside"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, r"line 2: field 'answer': 'c' is neither"),
    ({"choices": ["a", "b"], "answer": "a"}, r"line 2: field 'instruction': missing \(multiple-choice"),
])
def test_examples_from_records_errors(tmp_path, tiny_tokenizer, row, match):
    good = {"instruction": "q", "output": "a"} if "choices" not in row else {"question": "q", "choices": ["a", "b"],
                                                                             "answer": "a"}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=match) as e:
        examples_from_records([path], "alpaca", tiny_tokenizer)
    assert str(path) in str(e.value)
    with pytest.raises(DataError, match="file not found"):
        examples_from_records([str(tmp_path / "missing.jsonl")], "alpaca", tiny_tokenizer)
