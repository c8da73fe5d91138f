"""QLoRA through the real loop on the tiny model, beyond its contract row (NF4, fp32, ZeRO-2): NF4 under bf16 on
ZeRO-2 (DeepSpeed casts the module to bf16) and 8 bits. The packed weights come through the engine's cast and the
training bit-equal and in their integer dtype, and final/ loads back as the quantised model that was trained."""

import pytest
import torch
from peft import PeftModel

from distrib_ft.config import config_from_dict
from distrib_ft.methods import load_trained
from distrib_ft.model import load_model
from distrib_ft.runtime.loop import finish, run_steps, setup
from distrib_ft.runtime.worker import start_worker
from tests.jobs import job_dict

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64]])


@pytest.mark.parametrize(("bits", "bf16", "packed", "tolerance"), [
    (4, True, torch.uint8, 2e-2),  # trained in bf16, evaluated in fp32: bf16 rounding (measured 3.4e-3)
    (8, False, torch.int8, 1e-5),
])
def test_quantised_base_survives_training(tmp_path, tiny_model_dir, bits, bf16, packed, tolerance):
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, bf16=bf16, max_steps=3, save_steps=0)
    raw["method"] = {"type": "qlora", "r": 4, "lora_alpha": 8, "bits": bits}
    run = setup(start_worker(config_from_dict(raw)), resume=False)
    module = run.engine.module
    before = {n: p.detach().clone() for n, p in module.named_parameters() if ".base_layer." in n and p.ndim == 2}
    assert before and all(p.dtype == packed for p in before.values())  # after DeepSpeed's bf16 cast
    lora_dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
    assert lora_dtypes == {torch.bfloat16 if bf16 else torch.float32}
    run_steps(run)
    for n, p in module.named_parameters():
        if n in before:
            assert p.dtype == packed and torch.equal(p.detach(), before[n]), n
    with torch.no_grad():
        trained = module.eval()(input_ids=IDS).logits.float()
    module.train()
    summary = finish(run, None)
    assert summary["method"] == "qlora" and summary["artifact"] == "adapter"
    final = tmp_path / "out" / "final"
    assert (final / "qlora.json").is_file() and (final / "adapter_config.json").is_file()
    with torch.no_grad():
        rebuilt = load_trained(str(tiny_model_dir), final, load_model=load_model).eval()(input_ids=IDS).logits
        plain = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(final)).eval()(input_ids=IDS).logits
    torch.testing.assert_close(rebuilt, trained, rtol=0, atol=tolerance)
    # the adapter alone on the unquantised base is another model: evaluation must rebuild the quantised one
    assert float((plain - trained).abs().max()) > float((rebuilt - trained).abs().max())
