"""distrib_ft.retrain.merge_back: WiSE-FT interpolation of adapters and whole models, and choosing alpha.

No training loop: candidates are made directly on the tiny model (peft adapters with random non-zero A and B,
``init_lora_weights=False``; whole models with every weight moved by noise), so a wrong interpolation cannot pass.
Merged weights come from peft's own ``merge_and_unload``.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distrib_ft.retrain import merge_back as mb

ATOL = RTOL = 1e-6  # fp32 rounding of W0 + s (alpha B) A against W0 + alpha (W1 - W0); |dW| reaches ~25 (embeddings)


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def _merged(base_dir, adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    return {k: v.clone() for k, v in PeftModel.from_pretrained(_load(base_dir), str(adapter)).merge_and_unload()
            .state_dict().items()}


def _lora(base_dir, out: Path, *, targets=("q_proj", "v_proj"), seed=1, **kw) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    get_peft_model(_load(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                               init_lora_weights=False, **kw)).save_pretrained(out)
    shutil.copy2(Path(base_dir) / "tokenizer.json", out / "tokenizer.json")  # final/ holds the tokenizer too
    return out


def _moved(src, out: Path, *, dtype=torch.float32, seed=3, scale=0.05) -> Path:
    """A 'fine-tuned' copy of the model at ``src``: every floating weight moved by noise, saved in ``dtype``."""
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    model = _load(src)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.to(dtype).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)
    return out


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.name == mb.FISHER_FILE:
            continue
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.mark.parametrize("kw", [
    {},
    {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    {"lora_bias": True},
    {"targets": ("embed_tokens", "q_proj", "down_proj")},
], ids=["lora", "rslora_patterns", "lora_bias", "embedding"])
def test_adapter_merged_weights_are_start_plus_alpha_delta(tiny_model_dir, biased_model_dir, tmp_path, kw):
    kw = dict(kw)
    if kw.get("lora_bias"):  # the B bias merges into the layer's own bias
        tiny_model_dir = biased_model_dir
    cand = _lora(tiny_model_dir, tmp_path / "cand", **({"targets": kw.pop("targets")} if "targets" in kw else {}),
                 **kw)
    w0 = {k: v.clone() for k, v in _load(tiny_model_dir).state_dict().items()}
    w1 = _merged(tiny_model_dir, cand)
    changed = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert changed, "the candidate adapter changes no weight"
    for alpha in (0.75, 0.25):
        out = mb.interpolate(tiny_model_dir, cand, alpha, tmp_path / f"a{alpha}", kind="adapter")
        wa = _merged(tiny_model_dir, out)
        for k in w0:
            torch.testing.assert_close(wa[k], w0[k] + alpha * (w1[k] - w0[k]), atol=ATOL, rtol=RTOL, msg=k)
        assert (out / "adapter_config.json").read_bytes() == (cand / "adapter_config.json").read_bytes()
        assert (out / "tokenizer.json").read_bytes() == (cand / "tokenizer.json").read_bytes()
        record = json.loads((out / mb.RECORD_FILE).read_text())
        assert record["kind"] == "adapter" and record["alpha"] == alpha and "lora_B" in record["how"]
    one = mb.interpolate(tiny_model_dir, cand, 1.0, tmp_path / "a1", kind="adapter")
    t1, tc = _tensors(one), _tensors(cand)
    assert t1.keys() == tc.keys() and all(torch.equal(t1[k], tc[k]) for k in tc)  # alpha 1: the candidate
    zero = mb.interpolate(None, cand, 0, tmp_path / "a0", kind="adapter")  # start None: the recorded base
    w_zero = _merged(tiny_model_dir, zero)
    assert all(torch.equal(w_zero[k], w0[k]) for k in w0)  # alpha 0: the start, exactly


def test_dora_merged_weights_are_start_plus_alpha_delta(tiny_model_dir, tmp_path):
    """DoRA is not linear in its update; the interpolation still merges to exactly W0 + alpha (W1 - W0).

    The candidate trains on the base with an earlier adapter merged (method.merge_adapters), as round 2 of a LoRA
    pipeline does; its magnitudes are moved off their initial ||W0 + dW|| so that DoRA's renormalisation matters.
    """
    import yaml
    from peft import LoraConfig, PeftModel, get_peft_model

    from distrib_ft.export import load_merged

    earlier = _lora(tiny_model_dir, tmp_path / "r1", seed=5)

    def start():
        return load_merged(_load(tiny_model_dir), [earlier])

    torch.manual_seed(2)
    model = get_peft_model(start(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                               init_lora_weights=False, use_dora=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    run = tmp_path / "run"  # a run folder: final/ and the job's config.yaml naming the earlier adapter
    model.save_pretrained(run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"type": "lora", "merge_adapters": [str(earlier)]}}))
    cand = run / "final"

    def merged(adapter):
        return {k: v.clone() for k, v in PeftModel.from_pretrained(start(), str(adapter)).merge_and_unload()
                .state_dict().items()}

    w0 = {k: v.clone() for k, v in start().state_dict().items()}
    w1 = merged(cand)
    for alpha in (0.0, 0.25, 0.75, 1.0):
        out = mb.interpolate(tiny_model_dir, cand, alpha, tmp_path / f"a{alpha}", kind="adapter")
        wa = merged(out)
        for k in w0:
            torch.testing.assert_close(wa[k], w0[k] + alpha * (w1[k] - w0[k]), atol=ATOL, rtol=RTOL, msg=k)
        assert json.loads((out / mb.RECORD_FILE).read_text())["earlier"] == [str(earlier)]
    bare = shutil.copytree(cand, tmp_path / "bare")  # e.g. downloaded from a registry URL: no config.yaml beside
    with pytest.raises(ValueError, match=r"pass earlier=\[\.\.\.\]"):
        mb.interpolate(tiny_model_dir, bare, 0.5, tmp_path / "unknown", kind="adapter")
    given = mb.interpolate(tiny_model_dir, bare, 0.5, tmp_path / "given", kind="adapter", earlier=[earlier])
    assert _tensors(given).keys() == _tensors(tmp_path / "a0.25").keys()
    wg = merged(given)
    assert all(torch.allclose(wg[k], w0[k] + 0.5 * (w1[k] - w0[k]), atol=ATOL, rtol=RTOL) for k in w0)
    plain = mb.interpolate(tiny_model_dir, bare, 0.5, tmp_path / "wrong", kind="adapter", earlier=[])
    wrong = merged(plain)  # W0 without the earlier adapter: DoRA's norms are off, the result is not the midpoint
    k = "model.layers.0.self_attn.q_proj.weight"
    assert (wrong[k] - (w0[k] + 0.5 * (w1[k] - w0[k]))).abs().max() > 1e-4


def test_adapter_keeps_dtype_and_moves_ewc_anchors(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from distrib_ft.preservation.fisher import load_fisher, save_fisher

    cand = _lora(tiny_model_dir, tmp_path / "cand")
    model = PeftModel.from_pretrained(_load(tiny_model_dir), str(cand))
    half = tmp_path / "half"  # the same adapter saved in bf16 (as a bf16 run saves it)
    model.to(torch.bfloat16).save_pretrained(half)
    lora = {n: p.detach().float() for n, p in model.named_parameters() if ".lora_" in n}
    fisher = {n: torch.rand_like(t) for n, t in lora.items()}
    save_fisher(half / mb.FISHER_FILE, fisher, {"target": "trainable"}, lora)  # EWC on the adapter itself
    out = mb.interpolate(tiny_model_dir, half, 0.5, tmp_path / "out", kind="adapter")
    assert {t.dtype for t in _tensors(out).values()} == {torch.bfloat16}
    f2, anchors, info = load_fisher(out / mb.FISHER_FILE)
    assert all(torch.equal(f2[n], fisher[n]) for n in fisher) and info["merge_back_alpha"] == 0.5
    for n, t in lora.items():
        expect = t * 0.5 if ".lora_B." in n else t
        torch.testing.assert_close(anchors[n], expect.to(torch.bfloat16).float(), atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("stored", ["fp32", "bf16", "fp32_files_bf16_config", "mixed"])
def test_full_interpolation_is_exact_per_tensor(tiny_model_dir, tmp_path, stored):
    """Every tensor is lerp(start, candidate, alpha) in fp32, stored in the dtype it has in the candidate's files.

    ``fp32_files_bf16_config``: what a bf16 full fine-tuning run's final/ holds (the fp32 master weights under a
    config.json that says bfloat16); ``mixed``: bf16 weights with fp32 norms.
    """
    from distrib_ft.preservation.fisher import load_fisher, save_fisher

    cand = _moved(tiny_model_dir, tmp_path / "cand", dtype=torch.bfloat16 if stored == "bf16" else torch.float32)
    if stored in ("fp32_files_bf16_config", "mixed"):
        model = _load(cand)
        if stored == "mixed":
            model.save_pretrained(cand, state_dict={k: v if "norm" in k else v.to(torch.bfloat16)
                                                    for k, v in model.state_dict().items()})
        cfg = json.loads((cand / "config.json").read_text())
        (cand / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    s, c = _tensors(tiny_model_dir), _tensors(cand)
    assert len({t.dtype for t in c.values()}) == (2 if stored == "mixed" else 1)
    params = {n: t.float() for n, t in c.items()}
    save_fisher(cand / mb.FISHER_FILE, {n: torch.ones_like(t) for n, t in params.items()}, {"target": "trainable"},
                params)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        out = mb.interpolate(tiny_model_dir, cand, alpha, tmp_path / f"out{alpha}", kind="full")
        o = _tensors(out)
        assert o.keys() == c.keys()
        for k in c:
            expect = torch.lerp(s[k].float(), c[k].float(), alpha).to(c[k].dtype)
            assert o[k].dtype == c[k].dtype and torch.equal(o[k], expect), k
            if alpha == 1.0:
                assert torch.equal(o[k], c[k]), k
            if alpha == 0.0:
                assert torch.equal(o[k], s[k].to(c[k].dtype)), k
        assert (out / "config.json").read_bytes() == (cand / "config.json").read_bytes()
        assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
        _, anchors, _ = load_fisher(out / mb.FISHER_FILE)
        for k in c:
            assert torch.equal(anchors[k], torch.lerp(s[k].float(), c[k].float(), alpha)), k
    _load(out, "auto")  # a normal HF model folder


def test_full_keeps_tied_weights_tied(tmp_path):
    from distrib_ft.tiny import build_tiny_model

    start = build_tiny_model(tmp_path / "start", tie_word_embeddings=True)
    cand = _moved(start, tmp_path / "cand")
    out = mb.interpolate(start, cand, 0.5, tmp_path / "out", kind="full")
    model = _load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    s, c = _load(start).model.embed_tokens.weight, _load(cand).model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, torch.lerp(s, c, 0.5))
    assert not torch.equal(s, c)
    untied = _moved(start, tmp_path / "untied", seed=4)  # same names, but lm_head != embed_tokens in the start
    cfg = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    w = _load(untied)
    with torch.no_grad():
        w.lm_head.weight.copy_(w.model.embed_tokens.weight + 1)
    w.save_pretrained(untied)
    with pytest.raises(ValueError, match="are tied in the candidate .* but differ in the start"):
        mb.interpolate(untied, cand, 0.5, tmp_path / "bad", kind="full")


def test_bad_input_is_one_line(tiny_model_dir, tmp_path):
    from distrib_ft.tiny import build_tiny_model

    cand = _lora(tiny_model_dir, tmp_path / "cand")

    def err(*args, **kw) -> str:
        with pytest.raises(ValueError) as e:
            mb.interpolate(*args, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "give a number in [0, 1]" in err(tiny_model_dir, cand, 1.5, tmp_path / "o", kind="adapter")
    assert "give a number in [0, 1]" in err(tiny_model_dir, cand, float("nan"), tmp_path / "o", kind="adapter")
    assert "use one of adapter, full" in err(tiny_model_dir, cand, 0.5, tmp_path / "o", kind="lora")
    dora_emb = _lora(tiny_model_dir, tmp_path / "dora_emb", targets=("embed_tokens",), use_dora=True)
    assert "DoraEmbeddingVariant" in err(tiny_model_dir, dora_emb, 0.5, tmp_path / "o", kind="adapter", earlier=[])
    mts = _lora(tiny_model_dir, tmp_path / "mts", modules_to_save=["lm_head"])
    assert "modules_to_save" in err(tiny_model_dir, mts, 0.5, tmp_path / "o", kind="adapter")
    assert "not a peft LoRA adapter" in err(tiny_model_dir, tiny_model_dir, 0.5, tmp_path / "o", kind="adapter")
    assert "no Hugging Face model folder" in err(tiny_model_dir, cand, 0.5, tmp_path / "o", kind="full")
    assert "neither a model folder" in err(tmp_path / "no-such-model", tiny_model_dir, 0.5, tmp_path / "o", kind="full")
    assert "is inside" in err(tiny_model_dir, cand, 0.5, cand / "sub", kind="adapter")
    wider = build_tiny_model(tmp_path / "wider", hidden_size=48)
    assert "has shape" in err(tiny_model_dir, wider, 0.5, tmp_path / "o", kind="full")
    deeper = build_tiny_model(tmp_path / "deeper", num_layers=3)
    assert "only in the candidate" in err(tiny_model_dir, deeper, 0.5, tmp_path / "o", kind="full")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert "exists and is not empty" in err(tiny_model_dir, cand, 0.5, taken, kind="adapter")
    assert not (tmp_path / "o").exists()  # nothing written by a refused call
    mb.interpolate(tiny_model_dir, cand, 0.5, taken, kind="adapter", overwrite=True)
    assert not (taken / "x").exists() and (taken / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_choose_tries_largest_first_and_stops_at_the_first_pass():
    calls = []

    def measure(alpha):
        calls.append(alpha)
        return {"within_budget": alpha <= 0.5, "new_task_better": alpha >= 0.25, "general": 1 + alpha}

    got = mb.choose([0.25, 0.75, 0.5, 0.1], measure)
    assert calls == [0.75, 0.5] and got["alpha"] == 0.5
    assert got["table"] == [{"alpha": 0.75, "within_budget": False, "new_task_better": True, "general": 1.75},
                            {"alpha": 0.5, "within_budget": True, "new_task_better": True, "general": 1.5}]


def test_choose_no_pass_and_bad_input():
    calls = []

    def never(alpha):
        calls.append(alpha)
        return {"within_budget": alpha < 0.3, "new_task_better": alpha > 0.6}

    got = mb.choose((0.5, 0.75, 0.25), never)
    assert got["alpha"] is None and calls == [0.75, 0.5, 0.25]
    assert [r["alpha"] for r in got["table"]] == [0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="empty"):
        mb.choose([], never)
    with pytest.raises(ValueError, match="repeats"):
        mb.choose([0.5, 0.5], never)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mb.choose([2], never)
    with pytest.raises(ValueError, match="within_budget and new_task_better"):
        mb.choose([0.5], lambda a: {"within_budget": True})
