"""The driver's console through the real CLI and Ray (launcher/console.py): rank 0's lines and ours only.

Two embedded jobs at once (one quiet, one ``--verbose``), each with its own Ray; the line that says what a job
waits for on a cluster too small for it (a ``ray start`` head of 1 CPU); a failed job's Ray logs kept and named in
its error line. Only the processes a test started are ended, by PID.
"""

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrib_ft.config import DistributedConfig
from tests.e2e.test_cli import CLI, clean_env, live_ray_processes, ray_start_head, write_job
from tests.jobs import ROOT, job_dict, set_in

BIN = Path(sys.executable).parent
# What Ray prints on a driver's console and ours must not: a forwarded "(Actor pid=N)" line, its log records
# (the token warning, INFO lines), tracebacks of the controller or the placement-group cleaner, raylet lines.
RAY_LINE = re.compile(r"\([\w:.]+ pid=\d+|Traceback|WARNING|\bINFO\b|raylet|Found multiple active Ray|"
                      r"core_worker|::distrib-ft")
LOGS_LINE = re.compile(r"^distrib-ft: Ray's logs: (/tmp/dft-ray-\S+/logs)")


def _job(tmp_path: Path, tiny_model_dir: Path, workers: int, **training) -> Path:
    raw = job_dict(tmp_path, tiny_model_dir, per_device_train_batch_size=2, **training)
    set_in(raw, "distributed.num_workers", workers)
    if "max_failures" in DistributedConfig.model_fields:  # a failure here is the test's, not one to retry
        set_in(raw, "distributed.max_failures", 0)
    return write_job(tmp_path, raw)


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))


def _ray_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if RAY_LINE.search(line)]


def test_two_jobs_at_once_each_its_own_ray_one_quiet_one_verbose(tmp_path, tiny_model_dir):
    """Both exit 0; the quiet console is rank 0's lines and ours, the verbose one Ray's too (both ranks'); neither
    shows the other job's lines, nor a "multiple active Ray instances" traceback."""
    quiet = _job(tmp_path / "quiet", tiny_model_dir, workers=2, max_steps=2)
    loud = _job(tmp_path / "loud", tiny_model_dir, workers=2, max_steps=2)
    before = set(live_ray_processes("dft-ray-"))
    jobs = [_start("train", quiet), _start("train", loud, "--verbose")]
    (q_out, q_err), (v_out, v_err) = (p.communicate(timeout=900) for p in jobs)
    assert jobs[0].returncode == 0, q_err[-3000:]
    assert jobs[1].returncode == 0, v_err[-3000:]
    for out, job in ((q_out, quiet), (v_out, loud)):
        assert out.strip().splitlines()[-1] == f"Verdict: {job.parent / 'out' / 'verdict.json'}"

    assert not _ray_lines(q_out + q_err), _ray_lines(q_out + q_err)
    first = q_err.splitlines()[0]
    assert LOGS_LINE.match(first) and "--verbose shows them" in first, q_err[:2000]
    assert "step=1 loss=" in q_err and "step=2 loss=" in q_err  # rank 0's progress lines, without Ray's prefix
    assert str(tmp_path / "loud") not in q_out + q_err

    workers = set(re.findall(r"\(RayTrainWorker pid=(\d+)", v_out + v_err))
    assert len(workers) == 2, v_err[-3000:]  # --verbose: both ranks' lines, as Ray prints them
    assert "(TrainController pid=" in v_err and "INFO" in v_err + v_out  # Ray's own lines
    # Ray's State API in the placement-group cleaner found this job's Ray, not "multiple active Ray instances"
    # (Ray's own retry tracebacks, e.g. the controller's resource-request timeouts on a loaded machine, may be here)
    assert "Found multiple active Ray" not in v_out + v_err
    assert "::distrib-ft" not in v_out + v_err  # our rank markers are taken out in --verbose too
    assert str(tmp_path / "quiet") not in v_out + v_err
    loud_logs = [m.group(1) for m in map(LOGS_LINE.match, v_err.splitlines()) if m]  # after Ray's init lines
    assert len(loud_logs) == 1 and loud_logs[0] != LOGS_LINE.match(first).group(1), v_err[:3000]
    deadline = time.time() + 30
    while set(live_ray_processes("dft-ray-")) - before and time.time() < deadline:
        time.sleep(1)
    assert not set(live_ray_processes("dft-ray-")) - before, "a job left Ray processes behind"


def test_a_failed_job_keeps_rays_logs_and_says_where(tmp_path, tiny_model_dir):
    """A worker that cannot read the model's weights (the driver checks config and tokenizer only): exit 1, the
    worker's traceback (prefixed with its rank), the last line names Ray's logs, kept, where the traceback is."""
    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    job = _job(tmp_path, model, workers=1, max_steps=2)
    p = _start("train", job)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"distrib-ft: the job failed: .+ \(Ray's logs, kept, in (/tmp/dft-ray-[^/]+/\S+/logs)\)", last)
    assert m, err[-3000:]
    logs = Path(m.group(1))
    try:
        assert logs.is_dir()
        worker_err = "".join(f.read_text(errors="replace") for f in logs.glob("worker-*.err"))
        assert "Traceback" in worker_err and "::distrib-ft rank 0::" in worker_err
        assert list(logs.glob("distrib-ft-driver-*.log"))  # the driver's Ray records
        assert re.search(r"^\(rank 0 pid=\d+\) Traceback", err, re.M), err[-3000:]  # the error reached the console
        noise = [line for line in _ray_lines(out + err) if not line.startswith("(rank 0 pid=")]
        assert not noise, noise
    finally:
        shutil.rmtree(Path(*logs.parts[:3]), ignore_errors=True)  # /tmp/dft-ray-xxxx


@pytest.fixture
def small_head(monkeypatch):
    """A ``ray start`` head with 1 CPU, its own temp dir and ports; ended by PID."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as tests/e2e/test_cluster.py: a throwaway head
    with ray_start_head(num_cpus=1) as (temp_dir, port, _):
        yield f"127.0.0.1:{port}"
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_job_waiting_for_resources_says_what_is_missing(tmp_path, tiny_model_dir, small_head):
    """2 workers x 1 CPU on a head of 1 CPU: one line says so (Ray Train waits and retries in silence here)."""
    job = _job(tmp_path, tiny_model_dir, workers=2, max_steps=2)
    p = subprocess.Popen([*CLI, "train", str(job), "--address", small_head], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, deadline = [], time.time() + 300
    try:
        while time.time() < deadline:
            line = p.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if "waiting for" in line:
                break
        assert lines and lines[-1] == "distrib-ft: waiting for 2 workers x 1 CPU; the cluster has 1 CPU free " \
                                      "(1 in all)", "\n".join(lines)
        assert not _ray_lines("\n".join(lines)), lines
        for _ in range(3):  # Ctrl-C three times: Ray Train's abort waits for its placement group's timeout
            p.send_signal(signal.SIGINT)
            time.sleep(1)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1] == "distrib-ft: interrupted", err[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
