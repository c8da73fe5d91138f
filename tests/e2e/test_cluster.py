"""An existing Ray cluster: a local head with its own temp dir and ports, the job run with --address and
through `ray job submit`. Only the processes this test started are ended (by PID), never `ray stop`."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_cli import clean_env, cli, live_ray_processes, ray_start_head, write_job
from tests.jobs import ROOT, job_dict, set_in

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway head (see ray_start_head)
    with ray_start_head(num_cpus=3) as (temp_dir, port, dash):
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    assert not live_ray_processes(temp_dir)


def test_job_on_an_existing_cluster(tmp_path, tiny_model_dir, ray_head):
    address, dashboard = ray_head
    raw = job_dict(tmp_path, tiny_model_dir, max_steps=2, per_device_train_batch_size=2)
    set_in(raw, "distributed.num_workers", 2)
    job = write_job(tmp_path, raw)
    r = cli("train", job, "--address", address)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").exists()

    # The Jobs API: the driver runs on the head and connects with --address auto.
    env = clean_env(PYTHONPATH=str(ROOT))
    for _ in range(6):  # a loaded machine: the head's job agent may not be up yet, and Ray says to try again later
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--",
                            sys.executable, "-m", "launcher.cli", "train", str(job), "--address", "auto",
                            f"training.output_dir={tmp_path / 'out2'}"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        if "No available agent to submit job" not in r.stderr:
            break
        time.sleep(10)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "succeeded" in r.stdout
    assert (tmp_path / "out2" / "final" / "adapter_model.safetensors").exists()
