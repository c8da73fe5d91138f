"""Selective Token Masking in the training loop: the masked fraction is logged at step 0 and in the summary
(the masking itself: tests/unit/test_token_masking.py)."""

import numpy as np

from distrib_ft.config import config_from_dict
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, set_in


def test_the_loop_logs_the_masked_fraction(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, max_steps=2)
    set_in(raw, "token_masking", {"mode": "stm", "threshold": 300.0})
    summary = train(config_from_dict(raw))
    first = read_metrics(tmp_path / "out" / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["masked_fraction"] == summary["token_masking"]["masked_fraction"]
    assert 0 < first["masked_fraction"] < 1
    assert np.isclose(first["masked_tokens"] / summary["token_masking"]["target_tokens"], first["masked_fraction"])
