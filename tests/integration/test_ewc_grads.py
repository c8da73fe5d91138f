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
from distrib_ft.preservation import grad_buffers
from distrib_ft.preservation.ewc import EWC
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, set_in, toy_alpaca


def _run(tmp_path: Path, tiny_model_dir, zero: int, target: str, through_grads: bool, monkeypatch,
         in_place: bool = False, **training) -> tuple:
    raw = job_dict(tmp_path, tiny_model_dir, zero=zero, **{"max_steps": 3, **training},
                   gradient_accumulation_steps=2, per_device_train_batch_size=2, learning_rate=3e-3)
    if target == "trainable":
        set_in(raw, "method.type", "full")
    old = toy_alpaca(tmp_path / "old.jsonl", n=8, seed=11)
    set_in(raw, "ewc", {"lambda": 1e4, "target": target, "fisher_data_files": [str(old)], "fisher_max_sequences": 8})
    monkeypatch.setattr(EWC, "through_grads", through_grads)
    monkeypatch.setattr(EWC, "in_place", in_place)
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


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_in_place_gradient_equals_autograd_penalty(tmp_path, tiny_model_dir, zero, monkeypatch):
    """target=trainable: lambda F (theta - theta*) added in place into DeepSpeed's gradient buffers after the last
    micro-batch's backward (p.grad under ZeRO-0, the averaged partitions under ZeRO-1/2) = autograd of the scalar.

    Four steps, accumulation 2, clipping on (max_grad_norm 1, the norms are far above it), logging every 2nd
    step (the value computed on steps 2 and 4 only; step 3 adds the gradient without it), once per optimizer step.
    """
    calls = []
    add = grad_buffers.add_penalty_
    monkeypatch.setattr(grad_buffers, "add_penalty_", lambda *a, **k: calls.append(k["value"]) or add(*a, **k))
    new, new_pen, new_norm = _run(tmp_path / "in_place", tiny_model_dir, zero, "trainable", True, monkeypatch,
                                  in_place=True, logging_steps=2, max_steps=4)
    assert calls == [False, True, False, True]  # once per optimizer step, the value on logging steps only
    ref, ref_pen, ref_norm = _run(tmp_path / "autograd", tiny_model_dir, zero, "trainable", False, monkeypatch,
                                  logging_steps=2, max_steps=4)
    assert len(calls) == 4  # the reference never takes the in-place path
    assert new.keys() == ref.keys() and new
    for k in ref:
        assert torch.allclose(new[k], ref[k], rtol=1e-5, atol=1e-7), (k, float((new[k] - ref[k]).abs().max()))
    # the value at the logging step; the scalar reference logs the window's mean, and step 1's penalty is 0
    assert new_pen[0] == pytest.approx(2 * ref_pen[0], rel=1e-4) and new_pen[1] > 0
    assert new_norm == pytest.approx(ref_norm, rel=1e-4)
    assert min(ref_norm) > 1.0  # clipping (max_grad_norm 1) acted on every logged step
