"""distrib_ft.export: merged export, adapter combination and several adapters merged for evaluation.

No training loop: small adapters are made with peft directly on the tiny model (random, non-zero updates:
``init_lora_weights=False``), so every merge changes the logits and a wrong merge cannot pass.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from distrib_ft import export as ex

TOL = 1e-4


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _logits(model) -> torch.Tensor:
    ids = torch.arange(3, 3 + 2 * 16).reshape(2, 16) % 300
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _peft(base_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(base_dir), str(adapter))


def make_lora(base_dir, out: Path, *, r=4, seed=1, targets=("q_proj", "v_proj"), **kw) -> Path:
    """A LoRA adapter with random A and B (a real update) saved by peft, as final/ would hold one."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_base(base_dir), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                       init_lora_weights=False, **kw))
    model.save_pretrained(out)
    return out


def make_prompt_tuning(base_dir, out: Path) -> Path:
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    get_peft_model(_base(base_dir), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)
                   ).save_pretrained(out)
    return out


def make_beft(base_dir, out: Path, targets=("q_proj", "v_proj")) -> Path:
    from peft import BeftConfig, get_peft_model

    model = get_peft_model(_base(base_dir), BeftConfig(target_modules=list(targets)))
    torch.manual_seed(3)
    for n, p in model.named_parameters():
        if "beft_bias" in n:
            p.data.normal_(0, 0.5)  # a trained bias, not the zero init
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_export_merge_equals_base_plus_adapter(tmp_path, tiny_model_dir, use_dora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_lora(tiny_model_dir, tmp_path / "a", targets=("q_proj", "v_proj", "down_proj"), use_dora=use_dora)
    line = ex.export(adapter, tmp_path / "merged", merge=True)
    assert line.startswith(f"Exported the merged model to {tmp_path / 'merged'} (float32)"), line
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in n for n in merged.state_dict())
    expected = _logits(_peft(tiny_model_dir, adapter))
    assert (_logits(_base(tiny_model_dir)) - expected).abs().max() > 0.05  # the adapter changes the model
    assert (_logits(merged) - expected).abs().max() <= TOL
    AutoTokenizer.from_pretrained(tmp_path / "merged")  # the base's tokenizer came along (the adapter has none)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp folder left behind


def test_export_merge_in_bfloat16(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    adapter = make_lora(tiny_model_dir, tmp_path / "a")
    line = ex.export(adapter, tmp_path / "bf16", merge=True, dtype="bfloat16")
    assert "(bfloat16)" in line
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert merged.dtype == torch.bfloat16
    fp32 = ex.load_merged(_base(tiny_model_dir), [adapter])
    ref = fp32.state_dict()["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)
    assert torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"], ref)  # merged in fp32, then cast


def test_run_folder_exports_final_with_the_runs_earlier_adapters(tmp_path, tiny_model_dir):
    """A run of the EWC-LoRA chain trained on base + earlier adapters: the merged export includes them, in order."""
    from transformers import AutoModelForCausalLM

    first = make_lora(tiny_model_dir, tmp_path / "round1" / "final", seed=1)
    run = tmp_path / "round2"
    make_lora(tiny_model_dir, run / "final", seed=2, targets=("q_proj", "o_proj"))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)},
                                                     "method": {"type": "lora", "merge_adapters": [str(first)]}}))
    line = ex.export(run, tmp_path / "merged", merge=True)
    assert "after the run's 1 earlier adapter(s)" in line, line
    expected = _logits(ex.load_merged(_base(tiny_model_dir), [first, run / "final"]))
    assert (_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) - expected).abs().max() <= TOL
    assert (_logits(_peft(tiny_model_dir, run / "final")) - expected).abs().max() > 0.05  # the first round counts
    ex.export(run, tmp_path / "plain")  # without --merge: the README says what the adapter needs first
    assert f"merge them first, in order:\n    {first}" in (tmp_path / "plain" / "README.txt").read_text()


def test_a_qlora_adapter_merges_into_the_unquantised_base(tmp_path, tiny_model_dir):
    """QLoRA's final/ is a peft LoRA adapter plus qlora.json (its quantisation, its merge_adapters)."""
    from transformers import AutoModelForCausalLM

    first = make_lora(tiny_model_dir, tmp_path / "first", seed=5)
    adapter = make_lora(tiny_model_dir, tmp_path / "final", seed=1)
    (adapter / "qlora.json").write_text(json.dumps({"bits": 4, "quant_type": "nf4", "double_quant": True,
                                                    "compute_dtype": "float32", "merge_adapters": [str(first)]}))
    line = ex.export(adapter, tmp_path / "merged", merge=True)
    assert line.startswith(f"Exported the merged model to {tmp_path / 'merged'} (float32): the unquantised base "
                           f"{tiny_model_dir} + the QLoRA adapter after the run's 1 earlier adapter(s)"), line
    expected = _logits(ex.load_merged(_base(tiny_model_dir), [first, adapter]))
    assert (_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) - expected).abs().max() <= TOL


def test_export_without_merge_copies_the_adapter_as_it_is(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    adapter = make_lora(tiny_model_dir, tmp_path / "a")
    line = ex.export(adapter, tmp_path / "out")
    assert line == f"Exported the adapter {adapter} as it is to {tmp_path / 'out'} (how to load it: README.txt)"
    for f in adapter.iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()
    AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (_logits(_run_readme(tmp_path / "out")) - _logits(_peft(tiny_model_dir, adapter))).abs().max() == 0


def test_a_whole_model_is_resaved_in_the_dtype(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    line = ex.export(tiny_model_dir, tmp_path / "m16", dtype="float16", merge=True)
    assert "nothing to merge" in line and "(float16" in line
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    assert m.dtype == torch.float16
    base_sd = _base(tiny_model_dir).state_dict()
    assert all(torch.equal(v, base_sd[k].half()) for k, v in m.state_dict().items())


def test_prompt_tuning_is_not_merged_but_exported(tmp_path, tiny_model_dir):
    adapter = make_prompt_tuning(tiny_model_dir, tmp_path / "pt")
    line = ex.export(adapter, tmp_path / "out", merge=True)
    assert line.startswith("Not merged: prompt_tuning prepends virtual tokens"), line
    assert line.endswith(f"exported the adapter as it is to {tmp_path / 'out'} (how to load it: README.txt)")
    readme = (tmp_path / "out" / "README.txt").read_text()
    assert "It is not merged into the base weights" in readme and "num_virtual_tokens" in readme
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors"
                                                                              ).read_bytes()
    assert type(_run_readme(tmp_path / "out")).__name__ == "PeftModelForCausalLM"  # README.txt's code loads it


def test_beft_merges_only_into_layers_with_biases(tmp_path, tiny_model_dir, biased_model_dir):
    from transformers import AutoModelForCausalLM

    no_bias = make_beft(tiny_model_dir, tmp_path / "beft")  # the tiny Llama has no biases
    line = ex.export(no_bias, tmp_path / "out", merge=True)
    assert line.startswith("Not merged: a BEFT bias adapter on layers that have no bias (4, e.g. "), line
    assert (tmp_path / "out" / "adapter_config.json").exists() and (tmp_path / "out" / "README.txt").exists()

    biased = make_beft(biased_model_dir, tmp_path / "beft-biased")
    line = ex.export(biased, tmp_path / "merged", merge=True)
    assert line.startswith("Exported the merged model"), line
    expected = _logits(_peft(biased_model_dir, biased))
    assert (_logits(_base(biased_model_dir)) - expected).abs().max() > 0.05
    assert (_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) - expected).abs().max() <= TOL


def _run_readme(folder: Path):
    """Run the loading code README.txt shows (its indented lines); return its ``model``."""
    code = "\n".join(line[4:] for line in (folder / "README.txt").read_text().splitlines() if line.startswith("    "))
    scope = {}
    exec(code, scope)
    return scope["model"]


def test_a_bottleneck_adapter_is_exported_with_a_loader_that_works(tmp_path, tiny_model_dir):
    from distrib_ft.methods.bottleneck import Bottleneck, BottleneckConfig

    method = Bottleneck(BottleneckConfig(type="adapter", adapter_type="houlsby", reduction_factor=8))
    model = method.apply(_base(tiny_model_dir))
    torch.manual_seed(0)
    trained = {n: torch.randn_like(p) * 0.3 for n, p in model.named_parameters() if p.requires_grad}
    model.load_state_dict(trained, strict=False)
    method.export(model, trained, tmp_path / "final")
    line = ex.export(tmp_path / "final", tmp_path / "out", merge=True)
    assert line.startswith("Not merged: a bottleneck adapter adds non-linear blocks; they cannot be folded into the "
                           f"base weights; exported the adapter as it is to {tmp_path / 'out'}"), line
    assert (tmp_path / "out" / "tokenizer.json").exists()  # the base's tokenizer, for a self-contained folder
    loaded = _run_readme(tmp_path / "out")
    assert (_logits(loaded) - _logits(model)).abs().max() == 0
    assert (_logits(model) - _logits(_base(tiny_model_dir))).abs().max() > 0.05


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, tiny_model_dir):
    with pytest.raises(ex.ExportError, match=r"nope: no such folder; give a run's output_dir"):
        ex.export(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ex.ExportError, match="holds neither a peft adapter"):
        ex.export(tmp_path / "empty", tmp_path / "out")
    run = tmp_path / "run"
    (run / "rejected").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    with pytest.raises(ex.ExportError, match="a run folder with no final/: its model is out of the forgetting budget"):
        ex.export(run, tmp_path / "out")
    adapter = make_lora(tiny_model_dir, tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/gone/model"}))
    with pytest.raises(ex.ExportError, match="base model /gone/model not found .*; pass --base MODEL_FOLDER"):
        ex.export(adapter, tmp_path / "out", merge=True)
    assert "(float32)" in ex.export(adapter, tmp_path / "out", merge=True, base=str(tiny_model_dir))
    with pytest.raises(ex.ExportError, match="exists and is not empty; use --overwrite"):
        ex.export(adapter, tmp_path / "out", merge=True, base=str(tiny_model_dir))
    ex.export(adapter, tmp_path / "out", overwrite=True)  # replaced by the adapter copy
    assert (tmp_path / "out" / "adapter_config.json").exists() and not (tmp_path / "out" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty", "out", "run"]  # no temp folders left


def test_atomic_folder_leaves_nothing_when_the_writer_fails(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "x").write_text("old")
    for target in ("fresh", "keep"):
        with pytest.raises(RuntimeError), ex.atomic_folder(tmp_path / target, overwrite=True) as tmp:
            (tmp / "half").write_text("written")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["x"]


def test_cat_merge_equals_the_sum_of_the_updates(tmp_path, tiny_model_dir):
    a = make_lora(tiny_model_dir, tmp_path / "a", r=4, seed=1, targets=("q_proj", "v_proj"))
    b = make_lora(tiny_model_dir, tmp_path / "b", r=2, seed=2, targets=("q_proj", "o_proj", "down_proj"))
    line = ex.merge_adapters([a, b], tmp_path / "cat", method="cat")
    assert line == (f"Merged 2 LoRA adapters (cat, weights 1, 1) into one adapter of rank 6 on {tiny_model_dir}: "
                    f"{tmp_path / 'cat'}")
    record = json.loads((tmp_path / "cat" / "merge.json").read_text())
    assert record["method"] == "cat" and record["weights"] == [1.0, 1.0]
    assert [x["path"] for x in record["adapters"]] == [str(a), str(b)] and record["base"] == str(tiny_model_dir)
    combined = _logits(_peft(tiny_model_dir, tmp_path / "cat"))
    summed = _logits(ex.load_merged(_base(tiny_model_dir), [a, b]))
    assert (combined - summed).abs().max() <= TOL
    assert (combined - _logits(_peft(tiny_model_dir, a))).abs().max() > 0.05  # b's update is in it

    line = ex.merge_adapters([a, b], tmp_path / "cat-w", method="cat", weights=[0.5, -1.0])
    weighted = _logits(_peft(tiny_model_dir, tmp_path / "cat-w"))
    model = _base(tiny_model_dir)  # W + 0.5 * dW_a - dW_b, from the merged weights of each
    w0, wa, wb = (m.state_dict() for m in (_base(tiny_model_dir), ex.load_merged(_base(tiny_model_dir), [a]),
                                           ex.load_merged(_base(tiny_model_dir), [b])))
    model.load_state_dict({k: w0[k] + 0.5 * (wa[k] - w0[k]) - (wb[k] - w0[k]) for k in w0})
    assert (weighted - _logits(model)).abs().max() <= TOL


def test_linear_ties_and_dare_ties_run_and_load(tmp_path, tiny_model_dir):
    a = make_lora(tiny_model_dir, tmp_path / "a", r=4, seed=1)
    b = make_lora(tiny_model_dir, tmp_path / "b", r=4, seed=2, targets=("q_proj", "k_proj"))
    base = _logits(_base(tiny_model_dir))
    for method, density in (("linear", None), ("ties", 0.5), ("dare_ties", 0.3)):
        line = ex.merge_adapters([a, b], tmp_path / method, method=method, density=density, weights=[0.7, 0.3])
        assert f"({method}, weights 0.7, 0.3" in line and "rank 4" in line, line
        assert json.loads((tmp_path / method / "merge.json").read_text())["density"] == density
        assert (_logits(_peft(tiny_model_dir, tmp_path / method)) - base).abs().max() > 1e-3


def test_merge_refusals(tmp_path, tiny_model_dir, biased_model_dir):
    a = make_lora(tiny_model_dir, tmp_path / "a", r=4)
    b = make_lora(tiny_model_dir, tmp_path / "b", r=2)
    with pytest.raises(ex.ExportError, match=r"--method linear: the adapters have different ranks \(4, 2\); "
                                             "use --method cat"):
        ex.merge_adapters([a, b], tmp_path / "out", method="linear")
    other = make_lora(biased_model_dir, tmp_path / "other", r=4)
    with pytest.raises(ex.ExportError, match="--adapters: different base models"):
        ex.merge_adapters([a, other], tmp_path / "out", method="cat")
    pt = make_prompt_tuning(tiny_model_dir, tmp_path / "pt")
    with pytest.raises(ex.ExportError, match=r"is not a LoRA adapter \(PROMPT_TUNING\); only LoRA adapters"):
        ex.merge_adapters([a, pt], tmp_path / "out", method="cat")
    dora = make_lora(tiny_model_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(ex.ExportError, match="is a DoRA adapter: its update is not additive"):
        ex.merge_adapters([a, dora], tmp_path / "out", method="cat")
    with pytest.raises(ex.ExportError, match="--weights: 1 weight"):
        ex.merge_adapters([a, b], tmp_path / "out", method="cat", weights=[1.0])
    with pytest.raises(ex.ExportError, match="--density: only for ties and dare_ties"):
        ex.merge_adapters([a, b], tmp_path / "out", method="cat", density=0.5)
    with pytest.raises(ex.ExportError, match="at least two"):
        ex.merge_adapters([a], tmp_path / "out", method="cat")
    assert not (tmp_path / "out").exists()


def test_load_merged_refuses_adapters_that_do_not_merge(tmp_path, tiny_model_dir):
    a = make_lora(tiny_model_dir, tmp_path / "a")
    pt = make_prompt_tuning(tiny_model_dir, tmp_path / "pt")
    with pytest.raises(ex.NotMergeable, match=f"--model: {pt} cannot be merged into the base weights"):
        ex.load_merged(_base(tiny_model_dir), [a, pt])


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_an_exported_folder_gets_the_mode_of_a_plain_mkdir(tmp_path, mask):
    """mkdtemp's 0700 folder and safetensors' 0600 file become 0755 / 0644 under umask 0022; 0077 keeps them private."""
    import os
    import stat

    from safetensors.torch import save_file

    old = os.umask(mask)
    try:
        with ex.atomic_folder(tmp_path / "out") as tmp:
            save_file({"w": torch.ones(2)}, str(tmp / "model.safetensors"))
            (tmp / "README.txt").write_text("how to load it\n")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for f in ("model.safetensors", "README.txt"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o666 & ~mask, f
