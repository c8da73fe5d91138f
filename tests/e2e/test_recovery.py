"""A worker's death and a worker's hang, survived: the real CLI through an embedded Ray with 2 CPU workers.

``distributed.max_failures`` is Ray Train's FailureConfig; a restarted worker group resumes from the newest complete
checkpoint (distrib_ft/runtime/recovery.py). The test finds the Ray Train worker processes of its own job by a tag
in their environment (the embedded Ray's processes inherit the CLI's), SIGKILLs one after a checkpoint, SIGSTOPs
one of the next group (a hang: the other worker's collective times out), and checks that the job still ends with
the weights of an uninterrupted run. Every process the test stopped is killed by its PID at the end.
"""

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.e2e.test_cli import CLI, clean_env, cli, write_job
from tests.jobs import ROOT, job_dict, set_in, toy_join

TAG = "DISTRIB_FT_TEST_TAG"


def _job(tmp_path: Path, tiny_model_dir: Path, name: str, **distributed) -> Path:
    """2 workers, LoRA (dropout: the RNG matters), replay at 25% (its cursor matters), a checkpoint every 2 steps."""
    from distrib_ft.data import replay_buffer as rb

    folder = tmp_path / name
    raw = job_dict(folder, tiny_model_dir, max_steps=24, save_steps=2, save_total_limit=2,
                   per_device_train_batch_size=2, logging_steps=1)
    set_in(raw, "method.lora_dropout", 0.1)
    buffer = tmp_path / "buffer"
    if not buffer.exists():
        rb.build(str(buffer), [str(toy_join(tmp_path / "old.jsonl", n=12))], shard_size=3)
    set_in(raw, "replay", {"buffer": str(buffer), "ratio": 0.25, "prefetch": 4})
    set_in(raw, "distributed", {**raw["distributed"], "num_workers": 2, **distributed})
    return write_job(folder, raw)


def _workers(tag: str) -> set[int]:
    """PIDs of the live Ray Train workers started for ``tag`` (a process table scan: environ + title)."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmd and f"{TAG}={tag}".encode() in env and state not in "ZX":
            found.add(int(pid))
    return found


def _wait(what: str, cond, p: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        assert p.poll() is None, f"the job ended (exit {p.returncode}) while waiting for {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _complete_since(out: Path, t: float) -> list[int]:
    return sorted(int(c.parent.name.removeprefix("step-")) for c in (out / "checkpoints").glob("step-*/COMPLETE")
                  if c.stat().st_mtime > t)


def _start(job: Path, tag: str) -> subprocess.Popen:
    """The CLI in the background, its output in files beside the job (a pipe nobody reads could fill and block it)."""
    # Ray Train waits this long for a hung worker to leave its process group before killing it (default 30 s).
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S="5", **{TAG: tag})
    with open(job.parent / "stdout.txt", "w") as o, open(job.parent / "stderr.txt", "w") as e:
        p = subprocess.Popen([*CLI, "train", str(job)], cwd=ROOT, env=env, stdout=o, stderr=e)
    p.folder = job.parent
    return p


def _finish(p: subprocess.Popen, tag: str, stopped: set[int], timeout: float = 600) -> tuple[str, str]:
    """Wait for the CLI; then kill (by PID) the workers the test stopped and any of this job's left. Its output."""
    try:
        p.wait(timeout=timeout)
        return (p.folder / "stdout.txt").read_text(), (p.folder / "stderr.txt").read_text()
    finally:
        for pid in stopped | _workers(tag):  # ours only: a stopped worker, or one a failed test left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:  # Ctrl-C: the CLI stops its embedded Ray (a SIGKILL would leave Ray's processes)
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_killed_and_a_hung_worker_are_survived_with_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    job = _job(tmp_path, tiny_model_dir, "recovered", max_failures=2, collective_timeout_s=30)
    out = tmp_path / "recovered" / "out"
    tag, stopped = uuid.uuid4().hex, set()
    p = _start(job, tag)
    try:
        _wait("checkpoint step-2", lambda: (out / "checkpoints" / "step-2" / "COMPLETE").exists(), p)
        first = _wait("the workers", lambda: _workers(tag) if len(_workers(tag)) == 2 else None, p)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)  # a worker dies after a checkpoint
        second = _wait("a new worker group", lambda: (w if len(w := _workers(tag) - first) == 2 else None), p)
        started = time.time()
        _wait("a checkpoint of the new group", lambda: _complete_since(out, started), p)
        hung = min(second)
        os.kill(hung, signal.SIGSTOP)  # a worker hangs: the other one waits in a collective
        stopped.add(hung)
        _wait("a third worker group", lambda: len(_workers(tag) - first - second) == 2, p, timeout=240)
    except BaseException:
        _finish(p, tag, stopped, timeout=5)
        raise
    stdout, stderr = _finish(p, tag, stopped)
    assert p.returncode == 0, stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    attempts = summary["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3], attempts
    assert attempts[0]["resumed_from"] is None and attempts[0]["step"] == 0
    assert attempts[0]["error"].startswith("a worker died (rank ") and f"pid {victim}" in attempts[0]["error"], attempts
    assert attempts[1]["error"].startswith("a collective waited more than 30 s: a worker hangs or died"), attempts
    assert attempts[2]["error"] is None
    for a in attempts[1:]:
        assert a["resumed_from"] == f"checkpoints/step-{a['step']}" and a["step"] >= 2, attempts
    assert attempts[2]["step"] > attempts[1]["step"]
    for n, a in ((2, attempts[1]), (3, attempts[2])):  # rank 0's line when the attempt resumes
        line = f"attempt {n} of 3: {attempts[n - 2]['error']}; resuming from {a['resumed_from']}"
        assert line in stderr, stderr[-4000:]
    # the survivors' errors of a retried attempt are one line each, not gloo's tracebacks ("... GLHF!")
    assert "the job retries from its newest checkpoint" in stderr and "GLHF" not in stderr, stderr[-4000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 25))  # one line per step, as one uninterrupted run
    v = json.loads((out / "verdict.json").read_text())
    assert v["exit_code"] == 0 and len(v["attempts"]) == 1 and v["attempts"][0]["worker_attempts"] == attempts
    r = cli("status", out, timeout=120)
    assert r.returncode == 0 and "worker attempt 2: resumed from checkpoints/step-" in r.stdout, r.stdout

    reference = _job(tmp_path, tiny_model_dir, "uninterrupted")
    r = cli("train", reference)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads((tmp_path / "uninterrupted" / "out" / "summary.json").read_text())
    assert [(a["attempt"], a["error"]) for a in ref["attempts"]] == [(1, None)]
    a = load_file(out / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "uninterrupted" / "out" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, diff
    assert any(float((b[k] - torch.zeros_like(b[k])).abs().max()) > 0 for k in b if "lora_B" in k)  # it trained


def test_without_recovery_a_killed_worker_fails_the_job(tmp_path, tiny_model_dir):
    job = _job(tmp_path, tiny_model_dir, "norecovery", max_failures=0)
    out = tmp_path / "norecovery" / "out"
    tag = uuid.uuid4().hex
    p = _start(job, tag)
    try:
        _wait("checkpoint step-2", lambda: (out / "checkpoints" / "step-2" / "COMPLETE").exists(), p)
        workers = _wait("the workers", lambda: _workers(tag) if len(_workers(tag)) == 2 else None, p)
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
    except BaseException:
        _finish(p, tag, set(), timeout=5)
        raise
    stdout, stderr = _finish(p, tag, set())
    assert p.returncode == 1, stderr[-4000:]
    assert "distrib-ft: the job failed: WorkerLost: a worker died (rank " in stderr, stderr[-4000:]
    assert f"pid {victim}" in stderr.strip().splitlines()[-1], stderr[-4000:]
    v = json.loads((out / "verdict.json").read_text())
    assert (v["exit_code"], v["decision"], v["final"]) == (1, "failed", None)
    assert v["error"].startswith("WorkerLost: a worker died (rank ")
    assert [(w["attempt"], w["error"][:14]) for w in v["attempts"][0]["worker_attempts"]] == [(1, "a worker died ")]
    assert not (out / "final").exists() and "attempt 2 of" not in stderr
