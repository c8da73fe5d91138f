"""cluster/submit_retrain.py against a real Ray head (``ray start``, its own temp dir and ports, ended by PID): the
Jobs API client a scheduler runs (docs/scheduling.md). A real ``distrib-ft retrain`` whose one round forgets past
its budget comes back as 3 where ``ray job submit`` says 1; the same scheduler run again is reported, not re-run; a
run that ended with 1 gets a new attempt; a running job of the same command is followed, never doubled; a stopped
job is 130; a missing pipeline file is the CLI's own 2."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.e2e.test_cli import clean_env, live_ray_processes, ray_start_head
from tests.jobs import ROOT, job_dict, set_in, toy_join

BIN = Path(sys.executable).parent
DFT = str(BIN / "distrib-ft")


def _module():
    spec = importlib.util.spec_from_file_location("submit_retrain", ROOT / "cluster" / "submit_retrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ready_client(address: str):
    """A client once the head's job agent takes jobs (a loaded machine: Ray says 'try again later' until then)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    for _ in range(30):
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            time.sleep(5)
    while not client.get_job_status(job).is_terminal():
        time.sleep(1)
    return client


def _ids(client) -> list[str]:
    return sorted(j.submission_id for j in client.list_jobs())


def test_exit_codes_attempts_and_no_second_pipeline(tmp_path, tiny_model_dir, monkeypatch, capsys):
    sr = _module()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway head (see ray_start_head)
    # A one-round pipeline whose round forgets past its budget: tests/e2e/test_ray_up.py's breach job as the
    # template (full fine-tuning, a 0.1% budget on an old skill), so the pipeline refuses r1 and exits 3.
    template = job_dict(tmp_path / "t", tiny_model_dir, max_steps=4, learning_rate=5e-2)
    set_in(template, "method.type", "full")
    old = toy_join(tmp_path / "old.jsonl", n=8, seed=4)
    set_in(template, "monitor", {"suites": [{"name": "old", "files": [str(old)], "max_relative_increase": 0.001}]})
    set_in(template, "training.output_dir", str(tmp_path / "runs"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(template))
    train = template["data"]["train_files"][0]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "registry": str(tmp_path / "registry"), "base_model": str(tiny_model_dir), "job": "job.yaml",
        "retention_budget": 0.1, "rounds": [{"name": "r1", "train_files": [train], "eval_files": [train]}]}))
    out = tmp_path / "runs" / "r1"
    argv = ["--address", None, "--distrib-ft", DFT, "--submission-id", "nightly-1", str(pipeline)]

    with ray_start_head(num_cpus=3) as (temp_dir, _, dash):
        address = argv[1] = f"http://127.0.0.1:{dash}"
        client = _ready_client(address)

        # 1. The pipeline's own code through the Jobs API: 3, the round's line, the code line last.
        capsys.readouterr()
        assert sr.main(argv) == 3
        text = capsys.readouterr().out
        assert "submit_retrain: submitted nightly-1: " in text and "round r1: refused v0001: old over budget" in text
        assert text.rstrip().splitlines()[-1] == "distrib-ft exit code: 3", text[-3000:]
        assert (out / "verdict.json").is_file()
        # `ray job submit` of the same command (a re-run: the round's record, nothing trained) says 1
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--",
                            *sr.entrypoint(str(pipeline), [], DFT).split()],
                           capture_output=True, text=True, timeout=300, env=clean_env())
        assert r.returncode == 1 and "round r1: refused v0001" in r.stdout, (r.stdout + r.stderr)[-3000:]

        # 2. The same scheduler run again (a retried pod): reported, not run again.
        before = _ids(client)
        assert sr.main(argv) == 3
        assert "nightly-1 already ended with exit 3" in capsys.readouterr().out
        assert _ids(client) == before

        # 3. Exit 1: a retry submits attempt 2 (.2), then 3.
        assert sr.run(client, "exit 1", submission_id="flaky") == 1
        assert sr.run(client, "exit 1", submission_id="flaky") == 1
        assert [i for i in _ids(client) if i.startswith("flaky")] == ["flaky", "flaky.2"]
        assert "flaky ended with exit 1; submitting attempt 2" in capsys.readouterr().out

        # 4. A pipeline of the same command still running (its pod died): followed, not doubled.
        slow = f"sleep 6 && {DFT} status {out}"
        client.submit_job(entrypoint=slow, submission_id="nightly-2")
        assert sr.run(client, slow, submission_id="nightly-3") == 3
        assert "attaching to nightly-2" in capsys.readouterr().out
        assert not [i for i in _ids(client) if i.startswith("nightly-3")]

        # 5. `ray job stop`: 130 (ray job submit would have exited 0).
        client.submit_job(entrypoint="sleep 120", submission_id="stopped")
        while client.get_job_status("stopped").value == "PENDING":
            time.sleep(0.5)
        client.stop_job("stopped")
        while not client.get_job_status("stopped").is_terminal():
            time.sleep(0.5)
        info = client.get_job_info("stopped")
        assert sr.job_code(info.status, info.driver_exit_code) == 130

        # 6. A pipeline file the head lacks: the CLI's own exit 2, the code line last.
        capsys.readouterr()
        assert sr.main(["--address", address, "--distrib-ft", DFT, str(tmp_path / "missing.yaml")]) == 2
        text = capsys.readouterr().out
        assert text.rstrip().splitlines()[-1] == "distrib-ft exit code: 2", text[-2000:]
        assert "missing.yaml" in text, text[-2000:]
    assert not live_ray_processes(temp_dir)
