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
