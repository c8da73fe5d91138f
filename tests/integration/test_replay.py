"""Replay in the training loop: exact ratio per step, loss split, exact resume, carrying the buffer forward."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distrib_ft.config import config_from_dict
from distrib_ft.data import replay_buffer as rb
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, set_in, toy_join


def replay_job(tmp_path, tiny_model_dir, ratio=0.25, **training):
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, **training)
    buf = tmp_path / "buffer"
    if not buf.exists():
        rb.build(str(buf), [str(toy_join(tmp_path / "old.jsonl", n=30))], shard_size=8)
    return set_in(raw, "replay", {"buffer": str(buf), "ratio": ratio, "prefetch": 4})


@pytest.mark.parametrize("ratio,per_device,expected", [(0.25, 4, [1] * 6), (0.3, 4, [1, 1, 1, 1, 2, 1])])
def test_every_step_replays_the_exact_share(tmp_path, tiny_model_dir, ratio, per_device, expected):
    raw = replay_job(tmp_path, tiny_model_dir, ratio=ratio, per_device_train_batch_size=per_device)
    train(config_from_dict(raw))
    lines = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert [r["replay_sequences"] for r in lines] == expected  # 0.3 x 4: floor(1.2 s) = 0,1,2,3,4,6,7
    assert all(r["new_sequences"] + r["replay_sequences"] == per_device for r in lines)
    for r in lines:  # the step's loss is the token-weighted mix of the two
        assert min(r["loss_new"], r["loss_replay"]) - 1e-6 <= r["loss"] <= max(r["loss_new"], r["loss_replay"]) + 1e-6


def test_resume_neither_repeats_nor_skips_replay(tmp_path, tiny_model_dir):
    raw = replay_job(tmp_path / "a", tiny_model_dir, ratio=0.3, max_steps=8, save_steps=4, save_total_limit=3)
    train(config_from_dict(raw))
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    shutil.copytree(a, b)
    shutil.rmtree(b / "final")
    shutil.rmtree(b / "checkpoints" / "step-8")
    (b / "summary.json").unlink()
    raw_b = set_in(json.loads(json.dumps(raw)), "training.output_dir", str(b))
    train(config_from_dict(raw_b), resume=True)
    la, lb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    replayed = [(r["loss_replay"], r["replay_sequences"]) for r in la]
    assert [(r["loss_replay"], r["replay_sequences"]) for r in lb] == replayed
    wa, wb = load_file(a / "final" / "adapter_model.safetensors"), load_file(b / "final" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def test_resume_with_another_buffer_version_is_refused(tmp_path, tiny_model_dir):
    raw = replay_job(tmp_path, tiny_model_dir, max_steps=4, save_steps=2)
    train(config_from_dict(raw))
    shutil.rmtree(tmp_path / "out" / "final")
    rb.update(str(tmp_path / "buffer"), [str(tmp_path / "train.jsonl")])
    with pytest.raises(ValueError, match="trained on version 1 .* set replay.version: 1"):
        train(config_from_dict(raw), resume=True)


def test_update_after_carries_the_buffer_forward(tmp_path, tiny_model_dir):
    raw = replay_job(tmp_path, tiny_model_dir, max_steps=2)
    set_in(raw, "replay.update_after", True)
    set_in(raw, "replay.update_budget", 7)
    train(config_from_dict(raw))
    m = rb.read_manifest(str(tmp_path / "buffer"))
    assert m["version"] == 2 and {s["name"]: s["selected"] for s in m["sources"]} == {"old.jsonl": 30, "train.jsonl": 7}
    assert rb.read_manifest(str(tmp_path / "buffer"), 1)["records"] == 30


def test_replay_beside_streamed_new_data(tmp_path, tiny_model_dir):
    raw = replay_job(tmp_path, tiny_model_dir, ratio=0.5, max_steps=3)
    set_in(raw, "data.streaming", True)
    train(config_from_dict(raw))
    lines = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert [(r["new_sequences"], r["replay_sequences"]) for r in lines] == [(2, 2)] * 3
