"""QLoRA (distrib_ft/methods/qlora.py): what is quantised, and what the driver refuses before any worker starts."""

import pytest
import torch

from distrib_ft.config import config_from_dict
from distrib_ft.job import resolve
from distrib_ft.methods.qlora import quantise
from distrib_ft.model import load_model
from distrib_ft.schema import ConfigError
from tests.jobs import job_dict

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64]])


@pytest.mark.parametrize("bits", [4, 8])
def test_quantise_every_linear_but_the_head(tiny_model_dir, bits):
    import bitsandbytes as bnb

    model = load_model(str(tiny_model_dir)).eval()
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        quantise(model, bits=bits)
        after = model(input_ids=IDS).logits
    layer_type, dtype = (bnb.nn.Linear4bit, torch.uint8) if bits == 4 else (bnb.nn.Linear8bitLt, torch.int8)
    modules = dict(model.named_modules())
    assert linears and all(type(modules[n]) is layer_type and modules[n].weight.dtype == dtype for n in linears)
    assert type(modules["lm_head"]) is torch.nn.Linear and modules["lm_head"].weight.dtype == torch.float32
    assert getattr(model, f"is_loaded_in_{bits}bit")
    # the quantisation error is there, and bounded: 4 bits moves the logits more than 8 bits
    err = float((after - before).abs().max())
    assert (0.02 < err < 0.5) if bits == 4 else (1e-4 < err < 0.02), err
    # a quantised layer's state dict holds its parameters only (no absmax / SCB): checkpoints stay adapter-only
    assert {k for k in model.state_dict() if k.startswith(linears[0] + ".")} == {linears[0] + ".weight"}


@pytest.mark.parametrize(("zero", "method", "message"), [
    (3, {}, r"method.type: qlora supports ZeRO stages \[0, 1, 2\]; distributed.deepspeed is ZeRO-3"),
    (2, {"bits": 8, "quant_type": "fp4"}, "method.quant_type: 'fp4' applies to bits: 4 only"),
    (2, {"bits": 8, "compute_dtype": "bfloat16"}, "method.compute_dtype: 'bfloat16' applies to bits: 4 only"),
    (2, {"use_dora": True}, "method.use_dora: DoRA is not supported with type qlora"),
    (2, {"target_modules": ["qkv"]}, "method.target_modules: 'qkv' matches no module"),
])
def test_refused_on_the_driver(tmp_path, tiny_model_dir, zero, method, message):
    raw = job_dict(tmp_path, tiny_model_dir, zero=zero)
    raw["method"] = {"type": "qlora", "r": 4, "lora_alpha": 8, **method}
    with pytest.raises(ConfigError, match=message):
        resolve(config_from_dict(raw))


def test_eight_bits_with_the_defaults_resolves(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, zero=2)
    raw["method"] = {"type": "qlora", "bits": 8}
    assert resolve(config_from_dict(raw)).config.method.bits == 8


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_adapters_go_into_the_full_precision_base_before_quantising(tmp_path, tiny_model_dir, bits):
    """method.merge_adapters with QLoRA: the earlier round's LoRA adapter is merged into the fp32 base, then the
    merged weights are quantised; final/'s qlora.json records it and load_final rebuilds the same base."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from distrib_ft.methods import build_method
    from distrib_ft.methods.qlora import QLoRA, QLoRAConfig

    torch.manual_seed(0)
    earlier = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # B != 0: a real update
    earlier.save_pretrained(tmp_path / "round1")
    method = build_method(QLoRAConfig(r=4, lora_alpha=8, bits=bits, merge_adapters=[str(tmp_path / "round1")]))
    model = method.apply(load_model(str(tiny_model_dir))).eval()
    want = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(tmp_path / "round1")).merge_and_unload()
    want = quantise(want, bits=bits).eval()
    plain = quantise(load_model(str(tiny_model_dir)), bits=bits).eval()
    with torch.no_grad():
        got = model(input_ids=IDS).logits  # the new adapter starts at B = 0: the merged, quantised base
        torch.testing.assert_close(got, want(input_ids=IDS).logits, rtol=0, atol=0)
        assert not torch.allclose(got, plain(input_ids=IDS).logits, atol=1e-3)  # the earlier round is in it
    method.export(model, {k: v for k, v in model.state_dict().items() if "lora_" in k}, tmp_path / "final")
    with torch.no_grad():
        loaded = QLoRA.load_final(str(tiny_model_dir), tmp_path / "final", load_model=load_model).eval()
        torch.testing.assert_close(loaded(input_ids=IDS).logits, got, rtol=0, atol=0)
