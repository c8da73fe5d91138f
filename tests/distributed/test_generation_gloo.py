"""2 real gloo processes score generations like 1 process: 5 examples shard unevenly (3 + 2), the
short rank pads with a zero-weight repeat, and the sums are all-reduced. Both ranks run the scoring
twice: on a plain Hugging Face model, and on the module of a DeepSpeed ZeRO-3 engine whose parameters
are all partitioned, so that every decoding step gathers them collectively. An extra eos token makes
the ranks' generations end after different numbers of steps: without ``synced_gpus=True`` the rank
that finishes first would stop gathering and the other would wait for it forever."""

import json
import multiprocessing as mp
import os
import traceback
from pathlib import Path

from tests.jobs import ROOT

WORLD_SIZE = 2
NEW = 6
CONTENTS = ["hello", "convert 3 km to m", "the quick brown fox jumps over the lazy dog, then", "a", "question 7"]
CHOICES = [[" yes", " no"], [" 3000 m", " 30 m", " m"], [" dog", " fox"], [" b", " c"], [" 7", " seven"]]


def _prompts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
            for c in CONTENTS]


def _early_stop_token(model, tokenizer, prompts) -> int:
    """A token that, as an extra eos, ends some greedy generations early so that, with one example per
    generate call, the two ranks' calls take different numbers of decoding steps (rank 0 scores
    examples 0, 2, 4; rank 1 scores 1, 3 and then 3 again at zero weight)."""
    gens = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW, pad_token_id=tokenizer.pad_token_id)
        gens.append(out[0, ids.shape[1]:].tolist())
    for t in sorted({t for g in gens for t in g}):
        steps = [g.index(t) + 1 if t in g else NEW for g in gens]
        if [steps[i] for i in (0, 2, 4)] != [steps[i] for i in (1, 3, 3)]:
            return t
    raise AssertionError(f"no token makes the ranks' generation lengths differ: {gens}")


def _cases(model, tokenizer):
    """(name, examples, kwargs) with some right and some wrong answers, from 1-process generations."""
    from distrib_ft.monitor.generation import score_generations

    base = [{"prompt": p, "reference": "", "choices": c} for p, c in zip(_prompts(tokenizer), CHOICES)]
    gens = [s["generation"] for s in score_generations(model, tokenizer, base, metric="exact_match",
                                                       max_new_tokens=NEW, batch_size=5)["samples"]]
    em = [dict(e, reference=g if i in (0, 2, 3) else "wrong") for i, (e, g) in enumerate(zip(base, gens))]
    mc = [dict(e, reference=e["choices"][i % 2]) for i, e in enumerate(base)]
    return [("exact_match", em, {"max_new_tokens": NEW, "batch_size": 1}),
            ("multiple_choice", mc, {"batch_size": 2})]


def _rank_main(rank: int, port: int, model_dir: str, eos: list[int], cases: list, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                       "DS_ACCELERATOR": "cpu"})
    result = {}
    try:
        from distrib_ft.runtime import dist

        dist.apply_env(dist.worker_env(threads=1, use_gpu=False))  # before DeepSpeed: its private JIT-op cache
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from distrib_ft.model import load_model
        from distrib_ft.monitor.generation import score_generations
        from distrib_ft.runtime.engine import build_engine, load_deepspeed_config

        dist.init("gloo")
        tok = AutoTokenizer.from_pretrained(model_dir)
        plain = AutoModelForCausalLM.from_pretrained(model_dir)
        plain.generation_config.eos_token_id = eos
        for name, examples, kwargs in cases:
            result[f"plain/{name}"] = score_generations(plain, tok, examples, metric=name, **kwargs)
        cfg = load_deepspeed_config(ROOT / "ds_configs" / "zero3.json", micro_batch_size=1,
                                    gradient_accumulation_steps=1, world_size=WORLD_SIZE, max_grad_norm=1.0,
                                    bf16=False, learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
        engine = build_engine(load_model(model_dir, zero3_config=cfg), cfg, learning_rate=1e-3, weight_decay=0.0,
                              betas=(0.9, 0.999), eps=1e-8, warmup_steps=0, total_steps=1, scheduler_type="constant")
        engine.module.generation_config.eos_token_id = eos
        result["partitioned"] = all(p.numel() == 0 for p in engine.module.parameters())
        engine.train()
        for name, examples, kwargs in cases:
            result[f"zero3/{name}"] = score_generations(engine.module, tok, examples, metric=name, **kwargs)
        result["training_mode_kept"] = engine.module.training
        result = {"ok": True, **result}
    except BaseException:
        result = {"ok": False, "error": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_ranks_score_like_one(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from distrib_ft.monitor.generation import score_generations
    from distrib_ft.runtime.dist import free_port

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos = [tiny_tokenizer.eos_token_id, _early_stop_token(model, tiny_tokenizer, _prompts(tiny_tokenizer))]
    model.generation_config.eos_token_id = eos
    cases = _cases(model, tiny_tokenizer)
    single = {name: score_generations(model, tiny_tokenizer, ex, metric=name, **kw) for name, ex, kw in cases}
    assert (single["exact_match"]["correct"], single["exact_match"]["count"]) == (3, 5)
    assert 0 < single["multiple_choice"]["correct"] < 5  # a mix of right and wrong

    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tiny_model_dir), eos, cases, str(tmp_path)))
             for r in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        if p.is_alive():
            p.kill()
    results = []
    for r in range(WORLD_SIZE):
        f = tmp_path / f"rank{r}.json"
        res = json.loads(f.read_text()) if f.exists() else {"ok": False, "error": "no result"}
        assert res["ok"], f"rank {r} failed:\n{res['error']}"
        results.append(res)
    for res in results:
        assert res["partitioned"], "ZeRO-3 left some parameters whole: the test would not exercise gathering"
        assert res["training_mode_kept"]  # the engine is in train mode; scoring restored it
        for name, expected in single.items():
            for variant in ("plain", "zero3"):
                got = res[f"{variant}/{name}"]
                assert (got["correct"], got["count"], got["score"]) == (
                    expected["correct"], expected["count"], expected["score"]), f"{variant}/{name}"
    # Rank 0 scored examples 0, 2, 4: its samples are those of the single process.
    for variant in ("plain", "zero3"):
        got = [s["generation"] for s in results[0][f"{variant}/exact_match"]["samples"]]
        assert got == [single["exact_match"]["samples"][i]["generation"] for i in (0, 2, 4)]
