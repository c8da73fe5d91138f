"""The first run on a fresh machine: DeepSpeed's JIT-built CPU op (deepspeed_shm_comm) never leaves a job waiting.

torch's JIT build guards its folder with a ``lock`` file that names no process; a build killed midway left it
behind and every later job sat in ``FileBaton.wait`` (issue 11). Here, in a private DISTRIB_FT_CACHE: a build is
killed mid-compile with SIGKILL (the process group, as a scheduler ends a job), the build entry point run again
says it removed the stale lock, rebuilds and loads the op; a ``.so`` cut short is
rebuilt (not loaded: that is a SIGBUS); a job that then finds a planted stale lock says so and
completes. One killed build and one complete build (~1.3 min on 2 cores); the planted lock costs a relink.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distrib_ft.runtime import dist
from tests.e2e.test_cli import clean_env, write_job
from tests.jobs import ROOT, job_dict

OP = dist.SHM_OP


def _env(cache: Path) -> dict:
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DISTRIB_FT_CACHE=str(cache), DS_ACCELERATOR="cpu")
    env.pop("TORCH_EXTENSIONS_DIR", None)  # derived from DISTRIB_FT_CACHE, as on a fresh machine
    return env


def _build_dir(cache: Path) -> Path:
    import platform

    return cache / "torch_extensions" / f"py{platform.python_version()}" / OP


def test_a_lock_no_live_process_holds_is_stale_one_held_open_is_not(tmp_path):
    build = tmp_path / OP
    build.mkdir()
    lock = build / "lock"
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(lock)!r}, 'w'); import time; time.sleep(60)"])
    try:
        deadline = time.time() + 30
        while holder.pid not in dist.lock_holders(lock) and time.time() < deadline:
            time.sleep(0.1)
        assert holder.pid in dist.lock_holders(lock)  # a live builder holds its lock open
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists() and dist.lock_holders(lock) == []
    idle = subprocess.Popen(["sleep", "60"], cwd=build)  # a process that merely sits in the folder is no build
    try:
        assert dist.lock_holders(lock) == []
    finally:
        idle.kill()
        idle.wait()
    (build / f"{OP}.so").write_bytes(b"half")
    lines = []
    assert dist.clear_stale_lock(build, say=lines.append)
    assert not lock.exists() and not (build / f"{OP}.so").exists()  # the half-built op goes too
    assert len(lines) == 1 and lines[0].startswith(f"distrib-ft: removed a stale build lock {lock} (")
    assert not dist.clear_stale_lock(build, say=lines.append) and len(lines) == 1  # no lock: nothing said


def test_a_build_killed_midway_then_a_rebuild_and_a_job_past_a_stale_lock(tmp_path, tiny_model_dir):
    cache = tmp_path / "cache"
    build = _build_dir(cache)
    entry = [sys.executable, "-m", "distrib_ft.runtime.dist"]
    p = subprocess.Popen(entry, cwd=ROOT, env=_env(cache), text=True, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:  # mid-build: torch's lock is there and the compiler has run for a few seconds
        while not (build / "lock").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        time.sleep(5)
        assert p.poll() is None, p.communicate()[1][-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # the build entry point, ninja and the compiler: our own group
    _, err = p.communicate(timeout=60)
    assert f"building DeepSpeed's CPU communication op once (~1-2 min on 2 cores) into {build}" in err
    assert (build / "lock").exists() and not (build / f"{OP}.so").exists()  # what a killed build leaves

    r = subprocess.run(entry, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"distrib-ft: removed a stale build lock {build / 'lock'} (" in r.stderr
    assert "building DeepSpeed's CPU communication op once" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"distrib-ft: DeepSpeed's CPU communication op is ready in {build}"
    assert (build / f"{OP}.so").exists() and not (build / "lock").exists()

    so = build / f"{OP}.so"
    so.write_bytes(so.read_bytes()[:4096])  # cut short, and newer than its objects: ninja sees nothing to do
    r = subprocess.run(entry, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # loading it would be no ImportError: the process died of SIGBUS (seen before the ELF check)
    assert f"distrib-ft: {so} was cut short (4096 of at least " in r.stderr and "rebuilding it" in r.stderr
    assert so.stat().st_size > 4096

    (build / "lock").write_text("")  # as a build killed at its end leaves it: the job says so and completes
    job = write_job(tmp_path, job_dict(tmp_path, tiny_model_dir, max_steps=1))
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(job), "--launcher", "local"], cwd=ROOT,
                       env=_env(cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"distrib-ft: removed a stale build lock {build / 'lock'} (" in r.stderr
    assert (tmp_path / "out" / "final").exists() and not (build / "lock").exists()
