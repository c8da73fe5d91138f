"""The real CLI end to end: `distrib-ft train` through an embedded Ray with 2 CPU workers."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import ROOT, job_dict, set_in

CLI = [sys.executable, "-m", "launcher.cli"]


# An in-process job earlier in the same pytest process (a world of one) leaves these set, and its
# rendezvous port stays taken: a child must not inherit them.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra) -> dict:
    """os.environ without the launcher variables, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}, **extra}


def cli(*args, timeout=600):
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


# A log line a Ray actor's process forwarded to the driver: "(RayTrainWorker pid=123) ...", maybe coloured.
RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\([^()]*pid=\d+[^()]*\)")


def assert_one_line_error(r, *parts: str) -> str:
    """Exit code 2, and the last line of stderr is the CLI's error line naming ``parts`` (the file, the key);
    the CLI printed no traceback. Ray's forwarded worker logs (their own tracebacks included) may come before
    the line, never after it. Returns the line."""
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    own = [line for line in lines if not RAY_FORWARDED.match(line)]
    assert not any("Traceback" in line for line in own), r.stderr[-3000:]
    last = lines[-1]
    assert last.startswith("distrib-ft: error: "), r.stderr[-3000:]
    for part in parts:
        assert part in last, (part, last)
    return last


def write_job(tmp_path, raw) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def live_ray_processes(tag: str) -> list[str]:
    """Live processes of an embedded Ray started from this venv (other checkouts on a shared machine are not ours)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
        except OSError:
            continue
        if tag in cmd and sys.prefix in cmd and state != "Z":  # ours: started by this venv's interpreter
            found.append(f"{pid}: {cmd[:120]}")
    return found



@contextlib.contextmanager
def ray_start_head(num_cpus: int):
    """A ``ray start`` head with ``num_cpus`` CPUs, its own temp dir and ports; yields ``(temp_dir, port, dashboard
    port)``; ended by PID (SIGTERM twice, then SIGKILL: gcs_server outlived SIGTERM here), never ``ray stop``.

    The caller disables token auth (RAY_AUTH_MODE=disabled): a client of a throwaway head was refused here with
    the default token."""
    from distrib_ft.runtime.dist import free_port

    temp_dir = tempfile.mkdtemp(prefix="dft-head-", dir="/tmp")
    port, dash = free_port(), free_port()
    subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                    f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}",
                    f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
                   check=True, capture_output=True, env=clean_env(RAY_USAGE_STATS_ENABLED="0"), timeout=180)
    try:
        yield temp_dir, port, dash
    finally:
        for attempt in range(5):
            pids = [int(line.split(":")[0]) for line in live_ray_processes(temp_dir)]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM if attempt < 2 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(2)

def test_train_through_ray_with_two_workers(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, max_steps=4, save_steps=2, per_device_train_batch_size=2,
                   bf16=True)
    set_in(raw, "distributed.num_workers", 2)
    eval_file = tmp_path / "train.jsonl"
    set_in(raw, "data.eval_files", [str(eval_file)])
    job = write_job(tmp_path, raw)
    before = set(live_ray_processes("dft-ray-"))
    r = cli("train", job, "training.logging_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    assert f"Results in {out}" in r.stdout
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["training"]["logging_steps"] == 2 and cfg["distributed"]["num_workers"] == 2
    metrics = read_metrics(out / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [2, 4]
    # cosine from 1e-2 without warmup over 4 steps; each line logs the LR its step used, for step s (from 1)
    # 1e-2 * (1 + cos(pi * (s - 1) / 4)) / 2: 8.536e-3 at step 2, 1.464e-3 at step 4
    assert [m["learning_rate"] for m in steps] == pytest.approx([8.5355339e-3, 1.4644661e-3], rel=1e-6)
    for m in steps:
        assert m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens_per_second"] > 0
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 4]  # the baseline and the end
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    assert (out / "checkpoints" / "step-4" / "rng_rank1.safetensors").exists()
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert (out / "final" / "tokenizer_config.json").exists()
    assert set(live_ray_processes("dft-ray-")) <= before, "the embedded Ray left processes behind"

    # A finished output_dir is not overwritten by accident.
    r = cli("train", job)
    assert_one_line_error(r, f"{job}: training.output_dir: {out} already holds a finished run")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_data_errors_are_one_line_exit_2_on_the_driver_and_on_the_workers(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir)
    bad = tmp_path / "bad.jsonl"
    good = '{"instruction": "a", "output": "b"}\n'
    bad.write_text(good + '{"instruction": "c"}\n')
    set_in(raw, "data.train_files", [str(bad)])
    set_in(raw, "distributed.num_workers", 2)
    r = cli("train", write_job(tmp_path, raw))  # in the first records: found on the driver, no worker started
    assert_one_line_error(r, f"{bad}: line 2: field 'output': missing")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    bad.write_text(good * 99 + '{"instruction": "c"}\n')  # past what the driver reads: the workers' full check
    before = set(live_ray_processes("dft-ray-"))
    r = cli("train", write_job(tmp_path, raw))
    assert set(live_ray_processes("dft-ray-")) <= before, "a failed job left Ray processes behind"
    assert_one_line_error(r, "bad.jsonl", "line 100", "output")


@pytest.mark.parametrize("override, message", [
    ("training.learning_rat=1", "training.learning_rat: unknown key"),
    ("data.train_files=[nope.jsonl]", "data.train_files[0]: nope.jsonl not found"),
    ("distributed.deepspeed=missing.json", "distributed.deepspeed: missing.json not found"),
    ("model.name_or_path=/nonexistent/model",
     "model.name_or_path: /nonexistent/model is not a Hugging Face model folder"),
    # a URL typo trained into a local folder 's3:' and reported success (a new user's trial)
    ("training.output_dir=s3:/bucket/run", "training.output_dir: s3:/bucket/run is a URL with one slash"),
    ("training.output_dir=s4://bucket/run", "training.output_dir: s4://bucket/run: unknown filesystem 's4://'"),
])
def test_input_errors_fail_before_any_worker(tmp_path, tiny_model_dir, override, message):
    job = write_job(tmp_path, job_dict(tmp_path, tiny_model_dir))
    r = cli("train", job, override, timeout=120)
    assert_one_line_error(r, f"{job}: {message}")  # the line names the job file and the key
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_pinned_deepspeed_value_is_an_error(tmp_path, tiny_model_dir):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    job = write_job(tmp_path, job_dict(tmp_path, tiny_model_dir))
    r = cli("train", job, f"distributed.deepspeed={ds}", timeout=120)
    assert_one_line_error(r, f"{ds}: train_micro_batch_size_per_gpu is 16 but the job sets 4")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_local_launcher_runs_in_process(tmp_path, tiny_model_dir):
    job = write_job(tmp_path, job_dict(tmp_path, tiny_model_dir, max_steps=2))
    r = cli("train", job, "--launcher", "local")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "final" / "adapter_config.json").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1


def test_fisher_command_through_ray(tmp_path, tiny_model_dir):
    from distrib_ft.preservation.fisher import load_fisher
    from tests.jobs import toy_alpaca

    raw = job_dict(tmp_path, tiny_model_dir)
    set_in(raw, "distributed.num_workers", 2)
    set_in(raw, "ewc.fisher_data_files", [str(toy_alpaca(tmp_path / "old.jsonl", n=5))])
    out = tmp_path / "fisher.safetensors"
    r = cli("fisher", write_job(tmp_path, raw), "--out", out, "ewc.estimator=sampled")
    assert r.returncode == 0, r.stderr[-3000:]
    fisher, anchors, info = load_fisher(out)
    assert info["estimator"] == "sampled" and info["sequences"] == 5 and info["target_tokens"] > 0
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=raw["method"]["target_modules"]
                                      if "target_modules" in raw["method"] else
                                      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == names and set(anchors) == names

    job = write_job(tmp_path, raw)
    r = cli("fisher", job, "--out", out, "ewc.fisher_data_files=[]", timeout=120)
    assert_one_line_error(r, f"{job}: ewc.fisher_data_files: list the data to compute the Fisher on")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_same_loop_under_torchrun(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, max_steps=2, per_device_train_batch_size=2)
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(__import__("distrib_ft.runtime.dist", fromlist=["x"]).free_port()),
                        "-m", "launcher.cli", "train", str(write_job(tmp_path, raw)), "--launcher", "local"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["world_size"] == 2
    assert r.stdout.count("Results in") == 1


def test_budget_gate_exit_code_and_standalone_eval(tmp_path, tiny_model_dir):
    """A budget nothing can meet: exit code 3, the model in rejected/; `distrib-ft eval` reports the same."""
    from tests.jobs import toy_join

    raw = job_dict(tmp_path, tiny_model_dir, max_steps=4, learning_rate=5e-2)
    set_in(raw, "method.type", "full")
    set_in(raw, "data.eval_files", [raw["data"]["train_files"][0]])
    old = toy_join(tmp_path / "old.jsonl", n=8, seed=4)
    set_in(raw, "monitor", {"suites": [{"name": "old", "files": [str(old)], "max_relative_increase": 0.001}]})
    job = write_job(tmp_path, raw)
    r = cli("train", job, "--launcher", "local")
    assert r.returncode == 3, r.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "rejected" / "model.safetensors").exists() and not (out / "final").exists()
    assert "BREACHED" in r.stdout and "Decision: rejected" in r.stdout

    r = cli("eval", job, "--model", out / "rejected", "--launcher", "local")
    assert r.returncode == 3, r.stderr[-2000:]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["decision"] == "rejected" and [e["step"] for e in report["suites"]["old"]["evaluations"]] == [0, 1]
    r = cli("eval", job, "--model", out / "rejected", "monitor.suites.0.max_relative_increase=100", timeout=120)
    # suites is a list: the override path is refused with a clear error
    assert_one_line_error(r, f"{job}: override monitor.suites.0.max_relative_increase: suites is not a section")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_fresh_job_in_a_folder_with_checkpoints_is_refused_before_any_worker(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir)
    step = Path(raw["training"]["output_dir"]) / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("2\n")
    job = write_job(tmp_path, raw)
    r = cli("train", job, timeout=120)
    assert_one_line_error(r, f"{job}: training.output_dir: ", "holds checkpoints of an unfinished run (step-2); "
                          "use --resume to continue it, or another output_dir")
    r = cli("train", job, "--resume", timeout=120)  # and it is no checkpoint of this job either
    assert_one_line_error(r, f"{job}: --resume: ", "has no job.json")


@pytest.mark.parametrize("launcher", ["ray", "local"])
def test_ctrl_c_exits_130_with_a_message_on_both_launchers(tmp_path, tiny_model_dir, launcher):
    """shared case ray-interrupt-exit-code: Ray Train's own SIGINT handler turned Ctrl-C into exit 1, silently."""
    import signal
    import time

    raw = job_dict(tmp_path, tiny_model_dir, max_steps=100000, logging_steps=1)
    job = write_job(tmp_path, raw)
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    before = set(live_ray_processes("dft-ray-"))
    p = subprocess.Popen([*CLI, "train", str(job), "--launcher", launcher], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = Path(raw["training"]["output_dir"]) / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = p.communicate(timeout=180)
    assert p.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "distrib-ft: interrupted", err[-3000:]
    assert out.strip().splitlines()[-1] == f"Verdict: {Path(raw['training']['output_dir']) / 'verdict.json'}", out
    deadline = time.time() + 30
    while set(live_ray_processes("dft-ray-")) - before and time.time() < deadline:
        time.sleep(1)
    assert not set(live_ray_processes("dft-ray-")) - before, "an interrupted job left Ray processes behind"
