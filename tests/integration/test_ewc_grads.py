"""EWC's penalty through the gradients (issue 13, must-have 2) equals autograd of the scalar penalty.

The closed-form gradient lambda F (theta - theta*) (target=trainable) and its chain rule to the LoRA matrices
(target=lora_merged) enter DeepSpeed's gradient path through an autograd.Function; with ``EWC.through_grads =
False`` the loop runs the scalar penalty's autograd (the previous implementation). Three optimizer steps with two
micro-batches each (the loop's ``* accum``, DeepSpeed's division), the ds_configs' gradient clipping: the same
weights, penalty and gradient norm, under ZeRO-0 and ZeRO-2.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distrib_ft.config import config_from_dict
from distrib_ft.preservation.ewc import EWC
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, set_in, toy_alpaca


def _run(tmp_path: Path, tiny_model_dir, zero: int, target: str, through_grads: bool, monkeypatch) -> tuple:
    raw = job_dict(tmp_path, tiny_model_dir, zero=zero, max_steps=3, gradient_accumulation_steps=2,
                   per_device_train_batch_size=2, learning_rate=3e-3)
    if target == "trainable":
        set_in(raw, "method.type", "full")
    old = toy_alpaca(tmp_path / "old.jsonl", n=8, seed=11)
    set_in(raw, "ewc", {"lambda": 1e4, "target": target, "fisher_data_files": [str(old)], "fisher_max_sequences": 8})
    monkeypatch.setattr(EWC, "through_grads", through_grads)
    train(config_from_dict(raw))
    final = tmp_path / "out" / "final"
    weights = {f"{f.name}/{k}": v for f in sorted(final.glob("*.safetensors")) for k, v in load_file(f).items()}
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    return weights, [r["ewc_penalty"] for r in rows], [r["grad_norm"] for r in rows]


@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("target", ["trainable", "lora_merged"])
def test_gradient_path_equals_autograd_penalty(tmp_path, tiny_model_dir, zero, target, monkeypatch):
    new, new_pen, new_norm = _run(tmp_path / "grads", tiny_model_dir, zero, target, True, monkeypatch)
    ref, ref_pen, ref_norm = _run(tmp_path / "autograd", tiny_model_dir, zero, target, False, monkeypatch)
    assert new.keys() == ref.keys() and new
    for k in ref:
        assert torch.allclose(new[k], ref[k], rtol=1e-5, atol=1e-7), (k, float((new[k] - ref[k]).abs().max()))
    assert new_pen == pytest.approx(ref_pen, rel=1e-4, abs=1e-9)
    assert new_pen[-1] > 0  # the penalty acted (theta = theta* / dW = 0 at the first step only)
    assert new_norm == pytest.approx(ref_norm, rel=1e-4)  # counted in the gradient norm (clipped alike)
