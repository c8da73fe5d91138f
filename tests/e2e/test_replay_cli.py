"""The replay commands and a replay job through the real CLI and an embedded Ray with 2 workers."""

import json

from distrib_ft.runtime.metrics import read_metrics
from tests.e2e.test_cli import assert_one_line_error, cli, write_job
from tests.jobs import job_dict, set_in, toy_join


def test_replay_build_then_train_with_generation_through_ray(tmp_path, tiny_model_dir):
    old = toy_join(tmp_path / "old.jsonl", n=20)
    buf = tmp_path / "buffer"
    r = cli("replay", "build", "--out", buf, "--budget", "12", "--shard-size", "4", old)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "version 1: 12 records in 3 shard(s)" in r.stdout and "12 of 20 records" in r.stdout

    raw = job_dict(tmp_path, tiny_model_dir, zero=2, max_steps=3, per_device_train_batch_size=2)
    set_in(raw, "distributed.num_workers", 2)
    set_in(raw, "replay", {"buffer": str(buf), "ratio": 0.25, "update_after": True, "update_budget": 5})
    set_in(raw, "generative_replay", {"buffer": str(buf), "prompts_files": [str(old)], "num_examples": 4,
                                      "max_new_tokens": 6, "keep_unfinished": True, "min_response_chars": 1,
                                      "temperature": 1.0})
    r = cli("train", write_job(tmp_path, raw))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generative replay: 4 pseudo-examples" in r.stderr and "replay: 25.0% of every global batch" in r.stderr
    lines = [m for m in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in m]
    assert [m["replay_sequences"] for m in lines] == [1, 1, 1]  # 0.25 x (2 x 2 workers)

    r = cli("replay", "show", buf)
    assert r.returncode == 0 and "versions: 1, 2, 3" in r.stdout  # 2 = + generated, 3 = + train.jsonl sample
    assert "5 of 64 records" in r.stdout
    r = cli("replay", "show", buf, "--version", "1")
    assert r.returncode == 0 and "version 1: 12 records" in r.stdout, r.stderr[-2000:]


def test_a_damaged_buffer_is_a_one_line_input_error(tmp_path, tiny_model_dir):
    buf = tmp_path / "buffer"
    r = cli("replay", "build", "--out", buf, "--shard-size", "5", toy_join(tmp_path / "old.jsonl", n=10))
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((buf / "manifest.json").read_text())
    (buf / manifest["shards"][1]["path"]).unlink()
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, max_steps=2)
    set_in(raw, "replay", {"buffer": str(buf), "ratio": 0.5})
    r = cli("train", write_job(tmp_path, raw), "--launcher", "local")
    assert_one_line_error(r, "shard-00001.parquet: replay shard listed in the manifest is missing")

    r = cli("train", write_job(tmp_path, raw), "replay.buffer=" + str(tmp_path / "none"), "--launcher", "local")
    assert_one_line_error(r, f"{tmp_path / 'none'}: no replay buffer (manifest.json missing)")
    # a missing buffer is an input error found before the loop starts (README: the job file is validated
    # before any worker starts), so the error is all stderr holds
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
