"""`ray up`, `ray submit` and `ray down` for real: cluster/local.yaml against an sshd on 127.0.0.1 (a head only).

Ray's cluster launcher (https://docs.ray.io/en/latest/cluster/vms/references/ray-cluster-configuration.html, the
``local`` provider; https://docs.ray.io/en/latest/cluster/cli.html) reaches the head over SSH. The test makes a key,
starts its own sshd (Debian's openssh-server) on 127.0.0.1 at a free port with its own config, host key and pid file
in a temp dir (the machine's /etc/ssh is not read), derives the cluster YAML from cluster/local.yaml, and runs the
commands as a user would: ``ray up -y``, ``ray submit CLUSTER.yaml cluster/submit_train.py JOB.yaml key=value``
(a job that passes: exit 0; one out of its forgetting budget: 3), ``ray down -y``. What the derived YAML and the
head's environment change, and why (cluster/README.md says the same):

- ``auth``: the test's key and ``ssh_proxy_command: nc 127.0.0.1 PORT`` (Ray's ``auth`` has no port, and ssh reads
  ~/.ssh/config from the passwd entry's home, not from $HOME);
- the sshd gives every session ``HOME`` = a folder in the temp dir (``SetEnv``): ``~/distrib-ft`` (file_mounts),
  Ray's ~/ray_bootstrap_* files and the submitted script land there, never in the real home;
- setup_commands: the checkout's .venv linked into ~/distrib-ft instead of ``bash scripts/setup.sh`` (a fresh venv
  takes minutes); local.yaml's other setup commands run as they are;
- head_start_ray_commands: no ``ray stop`` (it ends every Ray on a machine; others run here), the head's own temp
  dir and free ports, 2 CPUs;
- that home's ~/.bashrc (Ray sources it before each command) sets RAY_ADDRESS to this head (``--address auto``
  could find another Ray on this shared machine), DISTRIB_FT_CACHE to this checkout's cache (DeepSpeed's CPU op
  is not built again) and a ``ray`` shell function whose ``ray stop`` -- what ``ray down`` runs on the head -- ends
  only this head's processes, by PID.

Every process the test started (sshd and its sessions, the head's Ray, ssh's control masters) is ended by PID.
"""

from __future__ import annotations

import getpass
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.jobs import ROOT, job_dict, set_in, toy_join

BIN = Path(sys.executable).parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
EXIT_LINE = re.compile(r"^distrib-ft exit code: (\d+)\s*$", re.M)  # cluster/submit_train.py's last line


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the test's sshd logs in as root (CI runs as root)"
    tools = {"sshd": SSHD if os.access(SSHD, os.X_OK) else None, "ssh": shutil.which("ssh"),
             "ssh-keygen": shutil.which("ssh-keygen"), "rsync": shutil.which("rsync"), "nc": shutil.which("nc")}
    absent = [name for name, path in tools.items() if not path]
    if absent:
        return (f"{', '.join(absent)} not installed: apt-get install openssh-server rsync netcat-openbsd "
                "(.ci/run installs them when run as root)")
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _matching(tag: str) -> list[int]:
    """Live processes (not this one) whose command line or environment holds ``tag``, a path only this test made:
    Ray's workers rename themselves (``ray::IDLE``) but keep the session's HOME."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
            blob = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        except (OSError, IndexError):
            continue
        if state != "Z" and tag.encode() in blob:
            found.append(int(pid))
    return found


def _children(pid: int) -> list[int]:
    """``pid``'s descendants (sshd's per-connection processes and the sessions under them)."""
    parents = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(p)] = int(Path(f"/proc/{p}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def end_processes(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still alive after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.2)


@dataclass
class Machine:
    """The head: an sshd on 127.0.0.1:port that logs ``user`` in with ``key`` and HOME = ``home``."""

    root: Path
    home: Path
    key: Path
    port: int
    user: str
    ray_tmp: Path  # the head's Ray temp dir (--temp-dir)
    gcs_port: int
    cluster_name: str


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"sshd did not listen on 127.0.0.1:{port} in {timeout} s: {log.read_text()[-2000:]}")


@pytest.fixture
def machine():
    from distrib_ft.runtime.dist import cache_dir, free_port

    root = Path(tempfile.mkdtemp(prefix="dft-up-", dir="/tmp"))  # short: Ray's socket paths live under it
    home, key, user = root / "home", root / "id_ed25519", getpass.getuser()
    home.mkdir()
    for k in (key, root / "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dft-test", "-f", str(k)], check=True)
    shutil.copy(f"{key}.pub", root / "authorized_keys")
    port, gcs_port = free_port(), free_port()
    m = Machine(root, home, key, port, user, root / "ray", gcs_port, cluster_name=f"dft-test-{root.name}")
    (root / "sshd_config").write_text("\n".join([
        f"ListenAddress 127.0.0.1:{port}", f"HostKey {root / 'host_key'}", f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", "AuthenticationMethods publickey",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        f"AllowUsers {user}", "UsePAM no", "StrictModes no",  # the key files sit under /tmp (world-writable)
        f"SetEnv HOME={home}", "LogLevel INFO", ""]))
    # The head's shell setup: Ray runs `source ~/.bashrc` before every command on the head.
    (home / ".bashrc").write_text(f"""\
export RAY_ADDRESS=127.0.0.1:{gcs_port} DISTRIB_FT_CACHE={cache_dir()} RAY_USAGE_STATS_ENABLED=0
export TMPDIR={root / 'head-tmp'} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# `ray down` runs `ray stop` here, which would end every Ray on this machine: end this head's only.
ray() {{
  if [ "$1" = stop ]; then PYTHONPATH={ROOT} {sys.executable} -m tests.e2e.test_ray_up stop {m.ray_tmp}
  else command ray "$@"; fi
}}
""")
    (root / "head-tmp").mkdir()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir (the package's)
    log = root / "sshd.log"
    with open(log, "w") as err:
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        _wait_for_port(port, sshd, log)
        yield m
    finally:
        # The head's Ray and the sessions' shells (HOME is in the temp dir), ssh's control masters (the key is),
        # sshd and its per-connection processes.
        sessions = _children(sshd.pid)
        end_processes([*_matching(str(root)), *sessions, sshd.pid])
        sshd.wait(10)
        left = [*_matching(str(root)), *filter(_alive, sessions)]
        control = hashlib.sha256(m.cluster_name.encode()).hexdigest()[:10]  # Ray's ssh ControlPath folder
        for d in glob.glob(f"/tmp/ray_ssh_*/{control}"):
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test left behind: {left}"


def cluster_yaml(m: Machine, jobs: Path) -> Path:
    """cluster/local.yaml as the test runs it (the module docstring says what changes)."""
    from distrib_ft.runtime.dist import free_port

    cfg = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    cfg["cluster_name"] = m.cluster_name
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["auth"] = {"ssh_user": m.user, "ssh_private_key": str(m.key), "ssh_proxy_command": f"nc 127.0.0.1 {m.port}"}
    cfg["file_mounts"]["~/jobs"] = str(jobs)
    built = [c for c in cfg["setup_commands"] if "scripts/setup.sh" in c]
    assert len(built) == 1, f"cluster/local.yaml: expected one setup command running scripts/setup.sh: {built}"
    cfg["setup_commands"] = [f"ln -sfn {ROOT / '.venv'} ~/distrib-ft/.venv" if c in built else c
                             for c in cfg["setup_commands"]]
    cfg["head_start_ray_commands"] = [
        f"ulimit -n 65536; ~/distrib-ft/.venv/bin/ray start --head --port={m.gcs_port} --num-cpus=2 "
        f"--temp-dir={m.ray_tmp} --dashboard-host=127.0.0.1 --dashboard-port={free_port()} "
        f"--ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()} "
        "--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats"]
    path = m.root / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ray_cli(m: Machine, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """The venv's ``ray`` CLI, run from the checkout (file_mounts' "." is it) as the user at the caller's end."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                          "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")}
    (m.root / "local-tmp").mkdir(exist_ok=True)
    env.update(TMPDIR=str(m.root / "local-tmp"),  # the local provider's state and lock files go here
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}")
    r = subprocess.run([str(BIN / "ray"), *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=timeout)
    r.stdout = r.stdout.replace("\r\n", "\n")  # the remote side runs under `ssh -tt`
    return r


def _exit_code(stdout: str) -> int:
    codes = EXIT_LINE.findall(stdout)
    assert codes, f"no 'distrib-ft exit code: N' line: {stdout[-3000:]}"
    return int(codes[-1])


def test_ray_up_submit_down(tmp_path, tiny_model_dir, machine):
    m = machine
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    ok = job_dict(tmp_path / "ok", tiny_model_dir, max_steps=2, per_device_train_batch_size=2)
    set_in(ok, "distributed.num_workers", 2)
    (jobs / "ok.yaml").write_text(yaml.safe_dump(ok))
    breach = job_dict(tmp_path / "breach", tiny_model_dir, max_steps=4, learning_rate=5e-2)  # test_verdict's
    set_in(breach, "method.type", "full")
    set_in(breach, "data.eval_files", [breach["data"]["train_files"][0]])
    old = toy_join(tmp_path / "old.jsonl", n=8, seed=4)
    set_in(breach, "monitor", {"suites": [{"name": "old", "files": [str(old)], "max_relative_increase": 0.001}]})
    set_in(breach, "distributed.num_workers", 2)
    (jobs / "breach.yaml").write_text(yaml.safe_dump(breach))
    cluster = cluster_yaml(m, jobs)

    t0 = time.time()
    r = ray_cli(m, "up", "-y", "--no-config-cache", "--log-style=record", cluster, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    t_up = time.time() - t0
    assert (m.home / "distrib-ft" / "launcher" / "cli.py").is_file()  # file_mounts: the checkout, in the test's ~
    assert not (m.home / "distrib-ft" / "outputs").exists()
    assert (m.home / "ray_bootstrap_config.yaml").is_file()
    assert _matching(str(m.ray_tmp)), "no Ray of the head's temp dir is running after `ray up`"

    # The head's shell as Ray sees it; `ray down` below relies on the `ray` function (only this head's Ray).
    r = ray_cli(m, "exec", "--no-config-cache", cluster, 'echo "HOME=$HOME"; type -t ray; command -v python',
                timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"HOME={m.home}\n" in r.stdout and "\nfunction\n" in r.stdout, r.stdout[-2000:]
    assert f"{m.home}/distrib-ft/.venv/bin/python\n" in r.stdout, r.stdout[-2000:]  # local.yaml's PATH line

    t0 = time.time()
    out = tmp_path / "ok" / "out"
    r = ray_cli(m, "submit", "--no-config-cache", cluster, ROOT / "cluster" / "submit_train.py", "~/jobs/ok.yaml",
                "training.logging_steps=2", timeout=400)
    t_ok = time.time() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert _exit_code(r.stdout) == 0 and f"Verdict: {out / 'verdict.json'}\n" in r.stdout, r.stdout[-3000:]
    v = json.loads((out / "verdict.json").read_text())
    assert (v["exit_code"], v["decision"], v["final"]) == (0, "accepted", str(out / "final"))
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert (out / "final" / "adapter_model.safetensors").is_file()
    worker_logs = [f.read_text(errors="replace") for f in m.ray_tmp.glob("session_*/logs/worker-*.out")]
    assert any(":actor_name:RayTrainWorker" in t for t in worker_logs), "the job's workers were not this head's"

    t0 = time.time()
    out = tmp_path / "breach" / "out"
    r = ray_cli(m, "submit", "--no-config-cache", cluster, ROOT / "cluster" / "submit_train.py",
                "~/jobs/breach.yaml", timeout=400)
    t_breach = time.time() - t0
    # `ray submit` exits 1 whatever the remote code (Ray raises click's ClickException): the line carries it.
    assert r.returncode == 1, (r.stdout + r.stderr)[-4000:]
    assert _exit_code(r.stdout) == 3 and f"Verdict: {out / 'verdict.json'}\n" in r.stdout, r.stdout[-3000:]
    v = json.loads((out / "verdict.json").read_text())
    assert (v["exit_code"], v["decision"], v["rejected"]) == (3, "rejected", str(out / "rejected"))

    t0 = time.time()
    r = ray_cli(m, "down", "-y", "--log-style=record", cluster, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    deadline = time.time() + 30
    while _matching(str(m.ray_tmp)) and time.time() < deadline:
        time.sleep(0.5)
    assert not _matching(str(m.ray_tmp)), "`ray down` left the head's Ray running"
    print(f"ray up {t_up:.0f} s, submit (exit 0) {t_ok:.0f} s, submit (exit 3) {t_breach:.0f} s, "
          f"down {time.time() - t0:.0f} s")


if __name__ == "__main__":  # the head's `ray stop` (see the ~/.bashrc the fixture writes): python -m ... stop TAG
    if sys.argv[1:2] == ["stop"] and len(sys.argv) == 3 and "/dft-up-" in sys.argv[2]:
        pids = [p for p in _matching(sys.argv[2]) if p != os.getppid()]
        print(f"ray stop (test head {sys.argv[2]}): ending {len(pids)} processes by PID")
        end_processes(pids)
