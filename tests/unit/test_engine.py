"""DeepSpeed JSON merge (auto values, pinned conflicts, unknown keys) and the LR schedule."""

import json
import math
from pathlib import Path

import pytest

from distrib_ft.runtime.engine import DeepSpeedConfigError, load_deepspeed_config, lr_factor

ROOT = Path(__file__).resolve().parents[2]
JOB = dict(micro_batch_size=4, gradient_accumulation_steps=2, world_size=2, max_grad_norm=1.0, bf16=True,
           learning_rate=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_shipped_configs_fill(name):
    cfg = load_deepspeed_config(ROOT / "ds_configs" / f"{name}.json", **JOB)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 16
    assert cfg["gradient_clipping"] == 1.0
    if name == "zero0":  # bf16 without ZeRO is torch autocast (DeepSpeed's stage-0 bf16 optimizer steps at set-up)
        assert cfg["bf16"]["enabled"] is False and cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    else:
        assert cfg["bf16"]["enabled"] is True and "torch_autocast" not in cfg
    assert "\"auto\"" not in json.dumps(cfg)


def write(tmp_path, raw):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(raw))
    return p


def test_pinned_conflict_is_an_error(tmp_path):
    p = write(tmp_path, {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}})
    with pytest.raises(DeepSpeedConfigError, match=r"ds.json: train_micro_batch_size_per_gpu is 8 but the job sets 4"):
        load_deepspeed_config(p, **JOB)


def test_pinned_equal_is_fine(tmp_path):
    p = write(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0})
    assert load_deepspeed_config(p, **JOB)["train_micro_batch_size_per_gpu"] == 4


def test_optimizer_lr_conflict(tmp_path):
    p = write(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 3e-3}}})
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer.params.lr"):
        load_deepspeed_config(p, **JOB)


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, {"zero_optimisation": {"stage": 2}})
    with pytest.raises(DeepSpeedConfigError, match=r"unknown top-level key 'zero_optimisation'"):
        load_deepspeed_config(p, **JOB)


def test_malformed_and_missing(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"bf16": {"enabled": "auto"},\n "x": }')
    with pytest.raises(DeepSpeedConfigError, match=r"line 2: not valid JSON"):
        load_deepspeed_config(p, **JOB)
    with pytest.raises(DeepSpeedConfigError, match="not found"):
        load_deepspeed_config(tmp_path / "none.json", **JOB)


def test_scheduler_section_refused(tmp_path):
    p = write(tmp_path, {"scheduler": {"type": "WarmupLR"}})
    with pytest.raises(DeepSpeedConfigError, match="scheduler"):
        load_deepspeed_config(p, **JOB)


def test_lr_schedule_shapes():
    kw = dict(warmup_steps=4, total_steps=20)
    assert [lr_factor(s, kind="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, kind="cosine", **kw) == 1.0
    assert math.isclose(lr_factor(12, kind="cosine", **kw), 0.5)
    assert lr_factor(20, kind="cosine", **kw) == 0.0
    assert math.isclose(lr_factor(12, kind="linear", **kw), 0.5)
    assert lr_factor(19, kind="constant", **kw) == 1.0
    assert lr_factor(0, warmup_steps=0, total_steps=10, kind="linear") == 1.0


def test_a_repeated_key_in_the_deepspeed_json_is_an_error(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"zero_optimization": {"stage": 2, "stage": 3}, "bf16": {"enabled": "auto"}}')
    with pytest.raises(DeepSpeedConfigError, match=r"ds.json: duplicate key 'stage' \(JSON keeps the last one"):
        load_deepspeed_config(p, **JOB)


def test_rng_state_round_trips_through_safetensors_without_pickle(tmp_path):
    import random

    import numpy as np
    import torch
    from safetensors import safe_open

    from distrib_ft.runtime.checkpoint import load_rng_state, save_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian is part of Python's state
    np.random.standard_normal()
    save_rng_state(tmp_path / "rng.safetensors")
    expected = (random.random(), random.gauss(0, 1), np.random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng_state(tmp_path / "rng.safetensors")
    got = (random.random(), random.gauss(0, 1), np.random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])
    with safe_open(str(tmp_path / "rng.safetensors"), framework="pt") as f:  # a safe format, readable as data
        assert set(f.keys()) >= {"torch", "numpy_key"} and set(f.metadata()) == {"python", "numpy"}


def test_a_checkpoint_of_another_geometry_or_job_is_refused(tmp_path):
    """Another job, or a number of workers that cannot keep the global batch, is refused; other batch keys or another
    number of workers are refitted to the checkpoint's global batch (distrib_ft/runtime/reshard.py)."""
    from distrib_ft.runtime.checkpoint import check_owner

    ckpt = tmp_path / "step-8"
    ckpt.mkdir()
    with pytest.raises(ValueError, match=r"has no job.json: it was not written by this version"):
        check_owner(ckpt, {"world_size": 1, "global_batch": 2, "job": {}})
    saved = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "seed": 1}
    (ckpt / "job.json").write_text(json.dumps({"world_size": 2, "global_batch": 4, "job": {"training": saved}}))
    with pytest.raises(ValueError, match=r"distributed.num_workers: 3 workers cannot keep the checkpoint's global "
                                         r"batch of 4 \(training.per_device_train_batch_size x "
                                         r"training.gradient_accumulation_steps x distributed.num_workers\)"):
        check_owner(ckpt, {"world_size": 3, "global_batch": 6, "job": {"training": saved}})
    check_owner(ckpt, {"world_size": 1, "global_batch": 2, "job": {"training": saved}})  # refitted to 2 x 2 x 1
    check_owner(ckpt, {"world_size": 2, "global_batch": 2,  # refitted to 1 x 2 x 2
                       "job": {"training": {**saved, "per_device_train_batch_size": 1}}})
    with pytest.raises(ValueError, match=r"belongs to another job \(training.seed: 1 there, 2 here\)"):
        check_owner(ckpt, {"world_size": 2, "global_batch": 4, "job": {"training": {**saved, "seed": 2}}})
    check_owner(ckpt, {"world_size": 2, "global_batch": 4, "job": {"training": saved}})  # its own: fine
