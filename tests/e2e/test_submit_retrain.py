"""cluster/submit_retrain.py against a real Ray head (``ray start``, its own temp dir and ports, ended by PID): the
Jobs API client a scheduler runs (docs/scheduling.md). It recovers the entrypoint's own exit code where ``ray job
submit`` says 1, reports an ended scheduler run again instead of re-running it, submits a new attempt after exit 1,
and follows a running job of the same command instead of starting a second pipeline."""

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
    # A job that forgets past its budget (exit 3): tests/e2e/test_ray_up.py's breach job, one worker.
    breach = job_dict(tmp_path / "breach", tiny_model_dir, max_steps=4, learning_rate=5e-2)
    set_in(breach, "method.type", "full")
    set_in(breach, "data.eval_files", [breach["data"]["train_files"][0]])
    old = toy_join(tmp_path / "old.jsonl", n=8, seed=4)
    set_in(breach, "monitor", {"suites": [{"name": "old", "files": [str(old)], "max_relative_increase": 0.001}]})
    (tmp_path / "breach.yaml").write_text(yaml.safe_dump(breach))
    out = tmp_path / "breach" / "out"
    train = f"{DFT} train {tmp_path / 'breach.yaml'} --address auto"

    with ray_start_head(num_cpus=3) as (temp_dir, _, dash):
        address = f"http://127.0.0.1:{dash}"
        client = _ready_client(address)

        # 1. The job's own code: 3, where `ray job submit` (below) says 1.
        capsys.readouterr()
        assert sr.run(client, train, submission_id="nightly-1") == 3
        text = capsys.readouterr().out
        assert f"Verdict: {out / 'verdict.json'}" in text, text[-3000:]
        assert "submit_retrain: submitted nightly-1" in text
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", DFT, "status", str(out)],
                           capture_output=True, text=True, timeout=300, env=clean_env())
        assert r.returncode == 1 and "rejected" in r.stdout, (r.stdout + r.stderr)[-3000:]
        # the script's CLI on the same status call: the line and the code (main() builds only `retrain`, so `run`)
        capsys.readouterr()
        assert sr.run(client, f"{DFT} status {out}") == 3

        # 2. The same scheduler run again (a retried pod): reported, not trained again.
        before = _ids(client)
        assert sr.run(client, train, submission_id="nightly-1") == 3
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

        # 6. main(): a pipeline file the head lacks is the pipeline's own exit 2, last line the code.
        capsys.readouterr()
        assert sr.main(["--address", address, "--distrib-ft", DFT, str(tmp_path / "missing.yaml")]) == 2
        text = capsys.readouterr().out
        assert text.rstrip().splitlines()[-1] == "distrib-ft exit code: 2", text[-2000:]
        assert "missing.yaml" in text, text[-2000:]
    assert not live_ray_processes(temp_dir)
