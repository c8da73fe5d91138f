"""An existing Ray cluster: a local head with its own temp dir and ports, the job run with --address and
through `ray job submit`. Only the processes this test started are ended (by PID), never `ray stop`."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distrib_ft.runtime.dist import free_port
from tests.e2e.test_cli import clean_env, cli, live_ray_processes, write_job
from tests.jobs import ROOT, job_dict, set_in

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(monkeypatch):
    temp_dir = tempfile.mkdtemp(prefix="dft-head-", dir="/tmp")
    port, dash = free_port(), free_port()
    # Ray 2.60 turns token auth on by default; a client of this throwaway head was refused here with
    # the default token, so the head and its clients in this test run without it.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = clean_env(RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--num-cpus=3", f"--temp-dir={temp_dir}",
                    f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=180)
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    finally:
        for attempt in range(5):  # SIGTERM twice, then SIGKILL (gcs_server outlived SIGTERM here)
            pids = [int(line.split(":")[0]) for line in live_ray_processes(temp_dir)]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM if attempt < 2 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(2)
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
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--",
                        sys.executable, "-m", "launcher.cli", "train", str(job), "--address", "auto",
                        f"training.output_dir={tmp_path / 'out2'}"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "succeeded" in r.stdout
    assert (tmp_path / "out2" / "final" / "adapter_model.safetensors").exists()
