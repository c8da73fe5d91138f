"""State on disk that belongs to another run is never taken as this run's (shared cases
output-dir-stale-checkpoints and resume-different-world-size)."""

import json
import shutil

import pytest

from distrib_ft.config import config_from_dict
from distrib_ft.runtime.loop import train
from tests.jobs import job_dict, set_in


@pytest.fixture
def interrupted(tmp_path, tiny_model_dir):
    """Job A, stopped after its step-2 checkpoint: checkpoints/ and no final/."""
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, max_steps=4, save_steps=2, save_total_limit=3, learning_rate=1e-2)
    train(config_from_dict(raw))
    out = tmp_path / "out"
    for gone in ("final", "checkpoints/step-4", "summary.json"):
        shutil.rmtree(out / gone) if (out / gone).is_dir() else (out / gone).unlink()
    return raw


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(interrupted):
    other = set_in(dict(interrupted), "training", {**interrupted["training"], "learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"training.output_dir: .* holds checkpoints of an unfinished run \(step-2\); "
                                         r"use --resume to continue it, or another output_dir"):
        train(config_from_dict(other))


def test_resume_refuses_another_jobs_checkpoint_and_continues_its_own(interrupted, tmp_path):
    other = set_in(dict(interrupted), "training", {**interrupted["training"], "learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"--resume: .*step-2 belongs to another job \(training.learning_rate: 0.01 "
                                         r"there, 0.001 here\); use another training.output_dir"):
        train(config_from_dict(other), resume=True)
    longer = set_in(dict(interrupted), "training", {**interrupted["training"], "max_steps": 6})  # may change
    assert train(config_from_dict(longer), resume=True)["steps"] == 6


def test_resume_with_another_micro_batch_keeps_the_global_batch(interrupted, tmp_path, capsys):
    """shared case resume-different-world-size: the data position is step x global batch, so another global batch
    would repeat or skip examples; the checkpoint records its geometry, and a job whose batch keys give another
    global batch (here per_device_train_batch_size 4 -> 2, e.g. against an out-of-memory error) is refitted to the
    checkpoint's: 2 x accumulation 2. (Another number of workers: tests/distributed/test_elastic_resume_gloo.py;
    one that cannot keep it: tests/unit/test_reshard.py.)"""
    other = set_in(dict(interrupted), "training", {**interrupted["training"], "per_device_train_batch_size": 2})
    assert train(config_from_dict(other), resume=True)["steps"] == 4
    assert ("resuming step-2 of 1 worker(s) on 1: global batch 4 kept as per_device_train_batch_size 2 x "
            "gradient_accumulation_steps 2 (the job had 2 x 1)") in capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "checkpoints" / "step-4" / "job.json").read_text())
    assert saved["global_batch"] == 4 and saved["job"]["training"]["gradient_accumulation_steps"] == 2


def test_a_longer_resume_follows_the_new_schedule_from_its_first_step(interrupted, tmp_path):
    """Resuming step 2 of a 4-step cosine run as an 8-step run: step 3 uses the 8-step schedule's LR (it used the
    LR restored from the checkpoint, the old schedule's)."""
    from distrib_ft.runtime.engine import lr_factor
    from distrib_ft.runtime.metrics import read_metrics

    longer = set_in(dict(interrupted), "training", {**interrupted["training"], "max_steps": 8})
    train(config_from_dict(longer), resume=True)
    lines = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r and r["step"] > 2]
    expected = [1e-2 * lr_factor(s - 1, warmup_steps=0, total_steps=8, kind="cosine") for s in range(3, 9)]
    assert [r["learning_rate"] for r in lines] == pytest.approx(expected, rel=1e-9)


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, max_steps=2)  # save_steps 0: final/ only
    train(config_from_dict(raw))
    with pytest.raises(ValueError, match=r"--resume: .* holds a finished run and no checkpoint to continue from"):
        train(config_from_dict(raw), resume=True)
