"""Each metrics.jsonl line holds the values of its own step (shared case lr-logged-next-step)."""

import pytest
import torch

from distrib_ft.config import config_from_dict
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict


@pytest.mark.parametrize("zero,accum", [(0, 1), (2, 2)])
def test_logged_learning_rate_is_the_one_its_step_used(tmp_path, tiny_model_dir, monkeypatch, zero, accum):
    used = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    raw = job_dict(tmp_path, tiny_model_dir, zero=zero, max_steps=4, learning_rate=1.0, lr_scheduler_type="linear",
                   warmup_steps=2, gradient_accumulation_steps=accum, per_device_train_batch_size=2)
    train(config_from_dict(raw))
    logged = [(r["step"], r["learning_rate"]) for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert used == [0.5, 1.0, 1.0, 0.5]  # warmup 1/2, 2/2, then linear decay to 0 at step 4
    assert logged == [(1, 0.5), (2, 1.0), (3, 1.0), (4, 0.5)]
