"""QLoRA on CUDA: NF4 base + bf16 through nccl and ZeRO-2. Skips without a GPU.

Run on a GPU machine with: python -m pytest tests/gpu/test_qlora_cuda.py -q
"""

import pytest
import torch
from safetensors.torch import load_file

from distrib_ft.methods import load_trained
from distrib_ft.methods.qlora import QLoRA, QLoRAConfig
from distrib_ft.model import load_model
from tests.jobs import job_dict, run_ranks, set_in

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64]])


def test_nf4_layers_move_to_cuda_and_train_in_bf16(tiny_model_dir):
    """What the engine does to the model apply() returns: cast floating parameters to bf16, move to the GPU."""
    import bitsandbytes as bnb

    model = QLoRA(QLoRAConfig(r=4, lora_alpha=8)).apply(load_model(str(tiny_model_dir)))
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    model = model.to("cuda")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.dtype == torch.uint8 and m.weight.is_cuda for m in layers)
    assert all(m.weight.quant_state.absmax.is_cuda for m in layers)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    logits = model(input_ids=IDS.cuda()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_qlora_nf4_bf16_zero2_nccl(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, bf16=True, max_steps=4, learning_rate=1e-2)
    set_in(raw, "distributed.backend", "nccl")
    raw["method"] = {"type": "qlora", "r": 4, "lora_alpha": 8, "bits": 4, "quant_type": "nf4"}
    summaries = run_ranks(raw, 1, tmp_path)
    assert summaries[0]["steps"] == 4 and summaries[0]["method"] == "qlora"
    final = tmp_path / "out" / "final"
    assert (final / "qlora.json").is_file()
    adapter = load_file(final / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in adapter.values())
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 1e-3  # lora_B starts at 0
    with torch.no_grad():  # the adapter trained on CUDA, on the NF4 base rebuilt on the CPU
        logits = load_trained(str(tiny_model_dir), final, load_model=load_model).eval()(input_ids=IDS).logits
    assert torch.isfinite(logits).all()
