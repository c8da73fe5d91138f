"""bf16 means the same arithmetic on every ZeRO stage (shared case zero0-bf16-adam-extra-step): AdamW's first
update is lr-sized, and final/ holds the fp32 master weights, not a bf16 copy."""

import pytest
import torch
from safetensors.torch import load_file

from distrib_ft.config import config_from_dict
from distrib_ft.runtime.loop import run_steps, setup
from distrib_ft.runtime.metrics import read_metrics
from distrib_ft.runtime.worker import start_worker
from tests.jobs import job_dict


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_first_update_and_export_are_the_same_on_every_zero_stage(tmp_path, tiny_model_dir, zero):
    from distrib_ft.runtime.loop import finish

    raw = job_dict(tmp_path, tiny_model_dir, zero=zero, max_steps=1, learning_rate=1e-2, bf16=True)
    run = setup(start_worker(config_from_dict(raw)), resume=False)
    with torch.no_grad():  # the forward computes in bf16 (ZeRO-0: torch autocast; 1-3: DeepSpeed's bf16 module)
        logits = run.engine(input_ids=torch.tensor([[5, 17, 42]])).logits
    assert logits.dtype == torch.bfloat16
    run_steps(run)
    finish(run, None)
    line = read_metrics(tmp_path / "out" / "metrics.jsonl")[-1]
    assert line["step"] == 1 and line["grad_norm"] is not None and line["grad_norm"] > 0  # every stage logs it
    b = torch.cat([v.flatten() for k, v in load_file(tmp_path / "out" / "final" / "adapter_model.safetensors").items()
                   if "lora_B" in k])
    # Adam's first step moves every weight by lr (B starts at 0): |B| / lr = 1 (it was 0.745 on ZeRO-0).
    assert (b.abs() / 1e-2).median().item() == pytest.approx(1.0, abs=1e-3)
    assert b.dtype == torch.float32 and (b != b.bfloat16().float()).float().mean() > 0.9  # fp32 master values
