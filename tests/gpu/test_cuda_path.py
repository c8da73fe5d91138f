"""The CUDA path: nccl, bf16, ZeRO-3, flash-attn when installed. Skips cleanly without a GPU.

Run on a GPU machine with: python -m pytest tests/gpu -q
"""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from tests.jobs import job_dict, run_ranks, set_in

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpu_job(tmp_path, tiny_model_dir, zero, **training):
    raw = job_dict(tmp_path, tiny_model_dir, zero=zero, bf16=True, **training)
    set_in(raw, "distributed.backend", "nccl")
    return raw


@pytest.mark.parametrize("zero", [2, 3])
def test_nccl_bf16_zero_one_gpu_per_rank(tmp_path, tiny_model_dir, zero):
    world = min(torch.cuda.device_count(), 2)
    raw = _gpu_job(tmp_path, tiny_model_dir, zero, max_steps=4, per_device_train_batch_size=2)
    summaries = run_ranks(raw, world, tmp_path)
    assert summaries[0]["steps"] == 4
    adapter = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in adapter.values())


def test_full_finetune_zero3_bf16(tmp_path, tiny_model_dir):
    raw = _gpu_job(tmp_path, tiny_model_dir, 3, max_steps=4, learning_rate=1e-3)
    set_in(raw, "method.type", "full")
    run_ranks(raw, 1, tmp_path)
    weights = load_file(tmp_path / "out" / "final" / "model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_is_chosen_and_trains(tmp_path, tiny_model_dir):
    from distrib_ft.model import resolve_attn_implementation

    assert resolve_attn_implementation("auto", use_cuda=True) == "flash_attention_2"
    raw = _gpu_job(tmp_path, tiny_model_dir, 2, max_steps=3)
    set_in(raw, "model.attn_implementation", "flash_attention_2")
    set_in(raw, "model.dtype", "bfloat16")
    run_ranks(raw, 1, tmp_path)
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").exists()
