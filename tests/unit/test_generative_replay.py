"""Generative replay: the filters, and the requested number of valid pseudo-examples from a real model."""

import json

from distrib_ft.data import replay_buffer as rb
from distrib_ft.preservation.generative_replay import GenerativeReplayConfig as GenerateConfig
from distrib_ft.preservation.generative_replay import ensure_generated, generate_records, reject_reason


def test_filters_name_the_reason():
    gen = GenerateConfig(prompts_files=["x"], min_response_chars=3)
    seen = {"seen prompt", "a seen answer"}
    assert reject_reason("p", "  ", True, seen, gen) == "empty"
    assert reject_reason("p", "ok", True, seen, gen) == "empty"  # shorter than min_response_chars
    assert reject_reason("p", "a long answer", False, seen, gen) == "length"
    assert reject_reason("p", "I'm sorry, but I can't help with that.", True, seen, gen) == "refusal"
    assert reject_reason("p", "As an AI language model, I ...", True, seen, gen) == "refusal"
    assert reject_reason("Seen  Prompt", "new answer", True, seen, gen) == "duplicate"
    assert reject_reason("p", "A SEEN answer", True, seen, gen) == "duplicate"
    assert reject_reason("p", "a fresh answer", True, seen, gen) is None
    assert reject_reason("p", "cut answer", False, seen, gen.model_copy(update={"keep_unfinished": True})) is None


def test_generates_the_requested_number_of_valid_examples(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"say something about {w}"}) + "\n"
                               for w in ["rivers", "stones", "clouds", "light", "tables", "apples"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # the random tiny model never says eos within 6 tokens: keep cut responses, sample so they differ
    gen = GenerateConfig(prompts_files=[str(prompts)], num_examples=10, max_new_tokens=6, keep_unfinished=True,
                         min_response_chars=1, temperature=1.0, batch_size=4)
    records, rejected = generate_records(model, tiny_tokenizer, gen, seed=0)
    assert len(records) == 10
    assert len({r["output"] for r in records}) == 10  # no duplicate responses
    assert all(set(r) == {"instruction", "input", "output"} and r["output"].strip() for r in records)

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(prompts.read_text())
    self_instruct = GenerateConfig(seed_files=[str(seeds)], num_examples=4, max_new_tokens=6, keep_unfinished=True,
                                   min_response_chars=1, temperature=1.0)
    buf = str(tmp_path / "buf")
    ensure_generated(model, tiny_tokenizer, buf, self_instruct, seed=1, model_name="tiny")
    m = rb.read_manifest(buf)
    assert m["records"] == 4 and m["sources"][0]["name"].startswith("generated-")
    ensure_generated(model, tiny_tokenizer, buf, self_instruct, seed=1, model_name="tiny")  # already there
    assert rb.list_versions(buf) == [1]
