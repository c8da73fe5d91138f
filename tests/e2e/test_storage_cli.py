"""`distrib-ft train` with ``training.output_dir: s3://...``: 2 Ray workers, a real S3 API (moto's server).

Everything the job writes arrives in the bucket (every rank's checkpoint files with their COMPLETE marker,
final/ with its marker, metrics.jsonl, the report, summary.json, verdict.json) and nothing lands in a local folder
named ``s3:``; the training data is read from the bucket. A checkpoint whose upload was interrupted (no marker) is
skipped on resume with a line saying so, the resumed job downloads its checkpoint from the bucket into an empty
staging folder, ``distrib-ft status s3://...`` exits with the job's code, and the same job submitted again does
not train.
"""

import json
import shutil
import subprocess
import sys
import uuid

from tests.e2e.test_cli import clean_env, write_job
from tests.jobs import ROOT, job_dict, set_in
from tests.s3 import list_keys, make_bucket, s3_env

CLI = [sys.executable, "-m", "launcher.cli"]
BUCKET = "e2e-storage"


def _cli(cwd, env, *args, timeout=600):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_a_two_worker_job_writes_to_s3_and_resumes_past_an_interrupted_upload(tmp_path, tiny_model_dir,
                                                                               s3_endpoint):
    make_bucket(s3_endpoint, BUCKET)
    prefix = f"{uuid.uuid4().hex[:8]}/run"
    url = f"s3://{BUCKET}/{prefix}"
    raw = job_dict(tmp_path, tiny_model_dir, max_steps=4, save_steps=2, save_total_limit=3)
    set_in(raw, "training.output_dir", url)
    set_in(raw, "distributed.num_workers", 2)
    set_in(raw, "data.eval_files", [raw["data"]["train_files"][0]])
    train_url = f"s3://{BUCKET}/{prefix}-data/train.jsonl"  # the training data on the bucket too
    _client(s3_endpoint).put_object(Bucket=BUCKET, Key=f"{prefix}-data/train.jsonl",
                                    Body=(tmp_path / "train.jsonl").read_bytes())
    set_in(raw, "data.train_files", [train_url])
    job = write_job(tmp_path, raw)
    work = tmp_path / "cwd"  # the driver's working directory: no "s3:" folder may appear in it
    work.mkdir()
    staging = tmp_path / "staging"
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DISTRIB_FT_STAGING=str(staging),
                    **s3_env(s3_endpoint))

    r = _cli(work, env, "train", job)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == f"Verdict: {url}/verdict.json"
    keys = {k.removeprefix(prefix + "/") for k in list_keys(s3_endpoint, BUCKET, prefix) if not k.endswith("/")}
    for step in (2, 4):
        ck = f"checkpoints/step-{step}"
        assert {f"{ck}/COMPLETE", f"{ck}/job.json", f"{ck}/mp_rank_00_model_states.pt",
                f"{ck}/rng_rank0.safetensors", f"{ck}/rng_rank1.safetensors",
                f"{ck}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                f"{ck}/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= keys, sorted(keys)
    assert {"final/COMPLETE", "final/adapter_model.safetensors", "final/adapter_config.json", "metrics.jsonl",
            "summary.json", "verdict.json", "config.yaml", "report.json", "report.md"} <= keys, sorted(keys)
    assert not list(work.iterdir()) and not (ROOT / "s3:").exists()
    summary = json.loads(_get(s3_endpoint, f"{prefix}/summary.json"))
    assert (summary["output_dir"], summary["final"], summary["world_size"]) == (url, f"{url}/final", 2)
    verdict = json.loads(_get(s3_endpoint, f"{prefix}/verdict.json"))
    assert (verdict["exit_code"], verdict["final"]) == (0, f"{url}/final")

    r = _cli(work, env, "status", url, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"Verdict {url}/verdict.json: exit 0 (accepted at step 4): {url}/final")
    r = _cli(work, env, "status", f"s3://{BUCKET}/nowhere", timeout=120)
    assert r.returncode == 2 and "no verdict.json" in r.stderr

    # An upload cut short: step-4's marker never arrived. A new node (empty staging) resumes from step-2.
    _delete(s3_endpoint, f"{prefix}/checkpoints/step-4/COMPLETE")
    shutil.rmtree(staging)
    r = _cli(work, env, "train", job, "training.max_steps=6", "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "checkpoints/step-4 has no COMPLETE marker (an interrupted upload); resuming from step-2" in r.stderr
    assert f"resumed from {url}/checkpoints/step-2 at step 2" in r.stderr
    steps = [json.loads(line)["step"] for line in _get(s3_endpoint, f"{prefix}/metrics.jsonl").splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
    keys = {k.removeprefix(prefix + "/") for k in list_keys(s3_endpoint, BUCKET, prefix)}
    assert {"checkpoints/step-4/COMPLETE", "checkpoints/step-6/COMPLETE", "final/COMPLETE"} <= keys
    verdict = json.loads(_get(s3_endpoint, f"{prefix}/verdict.json"))
    assert verdict["steps"] == 6 and verdict["attempts"][-1]["resumed_from"] == "step-2"
    r = _cli(work, env, "status", url, timeout=120)
    assert r.returncode == verdict["exit_code"] == 0, r.stderr[-3000:]
    # the same job submitted again: idempotent by output_dir, read on the URL
    r = _cli(work, env, "train", job, "training.max_steps=6", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"already finished: exit 0 (accepted at step 6): {url}/final"), r.stdout
    assert not list(work.iterdir())


def _client(endpoint):
    import boto3

    from tests.s3 import TEST_KEYS

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=TEST_KEYS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=TEST_KEYS["AWS_SECRET_ACCESS_KEY"],
                        region_name=TEST_KEYS["AWS_DEFAULT_REGION"])


def _get(endpoint, key: str) -> str:
    return _client(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def _delete(endpoint, key: str) -> None:
    _client(endpoint).delete_object(Bucket=BUCKET, Key=key)
