"""Which DeepSpeed configs step their optimizer in DeepSpeed's CPU Adam op (distrib_ft/runtime/offload_ops.py)."""

from pathlib import Path

import pytest

from distrib_ft.runtime.engine import load_deepspeed_config
from distrib_ft.runtime.offload_ops import offloads_optimizer

ROOT = Path(__file__).resolve().parents[2]
JOB = dict(micro_batch_size=1, gradient_accumulation_steps=1, world_size=2, max_grad_norm=1.0, bf16=False,
           learning_rate=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)


@pytest.mark.parametrize("name, offloads", [("zero0", False), ("zero2", False), ("zero3", False),
                                            ("zero3_offload", True)])
def test_shipped_configs(name, offloads):
    assert offloads_optimizer(load_deepspeed_config(ROOT / "ds_configs" / f"{name}.json", **JOB)) is offloads


def test_device_spellings():
    assert offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "CPU"}}})
    assert not offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "none"}}})
    assert not offloads_optimizer({"zero_optimization": {"offload_param": {"device": "cpu"}}})
    assert not offloads_optimizer({})
