"""verdict.json and `distrib-ft status` through the real CLI (``--launcher local``, the tiny model).

A scheduler reads the job's exit code back from the folder (``ray job submit`` reports every failure as 1), and
submitting the same job again never trains twice: a finished job exits with its recorded code, an interrupted one
resumes from its checkpoints.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.e2e.test_cli import CLI, clean_env, cli, write_job
from tests.jobs import ROOT, job_dict, set_in, toy_join


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_an_accepted_job_status_0_and_a_resubmit_trains_nothing(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, max_steps=2, save_steps=2)
    set_in(raw, "data.eval_files", [raw["data"]["train_files"][0]])
    job = write_job(tmp_path, raw)
    out = tmp_path / "out"
    r = cli("train", job, "--launcher", "local")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _last_line(r.stdout) == f"Verdict: {out / 'verdict.json'}"
    v = json.loads((out / "verdict.json").read_text())
    assert (v["exit_code"], v["decision"], v["final"], v["rejected"], v["steps"]) == (0, "accepted",
                                                                                     str(out / "final"), None, 2)
    assert v["metrics"]["eval_loss"] < v["metrics"]["eval_loss_start"]
    assert len(v["attempts"]) == 1 and v["attempts"][0]["exit_code"] == 0 and v["job"] == str(job)

    r = cli("status", out, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Verdict {out / 'verdict.json'}: exit 0 (accepted at step 2): {out / 'final'}")
    r = cli("status", out, "--json", timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout) == v

    metrics_before = (out / "metrics.jsonl").stat().st_mtime_ns
    r = cli("train", job, "--launcher", "local", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [f"already finished: exit 0 (accepted at step 2): {out / 'final'}; "
                                             f"eval_loss {v['metrics']['eval_loss_start']:.4f} -> "
                                             f"{v['metrics']['eval_loss']:.4f}; finished {v['finished']}",
                                             f"Verdict: {out / 'verdict.json'}"]
    assert (out / "metrics.jsonl").stat().st_mtime_ns == metrics_before  # nothing trained
    assert json.loads((out / "verdict.json").read_text()) == v  # the verdict is the finished run's

    r = cli("status", tmp_path / "nowhere", timeout=120)  # no verdict: one line, exit 2
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no verdict.json" in r.stderr


def test_a_budget_breach_status_3_and_a_resubmit_exits_3_again(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, max_steps=4, learning_rate=5e-2)  # as test_cli's exit-3 job
    set_in(raw, "method.type", "full")
    set_in(raw, "data.eval_files", [raw["data"]["train_files"][0]])
    old = toy_join(tmp_path / "old.jsonl", n=8, seed=4)
    set_in(raw, "monitor", {"suites": [{"name": "old", "files": [str(old)], "max_relative_increase": 0.001}]})
    job = write_job(tmp_path, raw)
    out = tmp_path / "out"
    r = cli("train", job, "--launcher", "local")
    assert r.returncode == 3, r.stderr[-3000:]
    assert _last_line(r.stdout) == f"Verdict: {out / 'verdict.json'}"
    v = json.loads((out / "verdict.json").read_text())
    assert (v["exit_code"], v["decision"], v["final"], v["rejected"]) == (3, "rejected", None, str(out / "rejected"))
    suite = v["metrics"]["suites"]["old"]
    assert suite["within_budget"] is False and suite["value"] > suite["baseline"]

    r = cli("status", out, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "BREACHED" in r.stdout and f"rejected (out of the forgetting budget): {out / 'rejected'}" in r.stdout

    r = cli("train", job, "--launcher", "local", timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert r.stdout.startswith("already finished: exit 3 (rejected)")
    assert json.loads((out / "verdict.json").read_text()) == v

    r = cli("eval", job, "--model", out / "rejected", "--launcher", "local")  # eval's own verdict, beside its report
    assert r.returncode == 3, r.stderr[-3000:]
    assert _last_line(r.stdout) == f"Verdict: {out / 'eval' / 'verdict.json'}"
    e = json.loads((out / "eval" / "verdict.json").read_text())
    assert (e["command"], e["exit_code"], e["decision"]) == ("eval", 3, "rejected")
    assert e["metrics"]["suites"]["old"]["within_budget"] is False
    assert cli("status", out / "eval", timeout=120).returncode == 3
    assert json.loads((out / "verdict.json").read_text()) == v  # the training's verdict is untouched


def test_a_crash_writes_a_failed_verdict_and_status_exits_1(tmp_path, tiny_model_dir):
    """Weights that cannot be read: the job starts (the driver checks config and tokenizer only) and fails."""
    import shutil

    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    job = write_job(tmp_path, job_dict(tmp_path, model, max_steps=2))
    out = tmp_path / "out"
    r = cli("train", job, "--launcher", "local", timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert _last_line(r.stdout) == f"Verdict: {out / 'verdict.json'}"
    v = json.loads((out / "verdict.json").read_text())
    assert (v["exit_code"], v["decision"], v["final"]) == (1, "failed", None)
    assert v["error"] and "\n" not in v["error"] and v["error"] in r.stderr
    r = cli("status", out, timeout=120)
    assert r.returncode == 1 and f"error: {v['error']}" in r.stdout


def test_an_interrupted_job_resumes_when_submitted_again(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, max_steps=30, save_steps=2, save_total_limit=2)
    job = write_job(tmp_path, raw)
    out = tmp_path / "out"
    p = subprocess.Popen([*CLI, "train", str(job), "--launcher", "local"], cwd=ROOT, text=True,
                         env=clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-2" / "COMPLETE").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGKILL)  # a node lost, a job killed: no verdict, no final/
    p.communicate(timeout=60)
    assert not (out / "verdict.json").exists() and not (out / "final").exists()
    last = sorted(int(c.name.removeprefix("step-")) for c in (out / "checkpoints").glob("step-*")
                   if (c / "COMPLETE").exists())[-1]
    assert last < 30
    r = cli("status", out)  # a driver that died wrote no verdict: status says where the run got to
    assert r.returncode == 2 and f"checkpoints up to step-{last}: the job is running, or its driver died; submit " \
        "the same job again to resume it" in r.stderr, r.stderr

    r = cli("train", job, "--launcher", "local", "training.max_steps=12", timeout=300)  # another length: refused
    assert r.returncode == 2, r.stderr[-3000:]
    assert "holds an unfinished run of this job with another length (training.max_steps: 30 there, 12 here); " \
        "use --resume" in _last_line(r.stderr)

    r = cli("train", job, "--launcher", "local", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{out} holds an unfinished run of this job: resuming it from step-{last} (as --resume)" in r.stderr
    assert f"resumed from {out / 'checkpoints' / f'step-{last}'} at step {last}" in r.stderr
    assert _steps(out)[-1] == 30 and [s for s in _steps(out) if s > last] == list(range(last + 1, 31))
    v = json.loads((out / "verdict.json").read_text())
    assert v["exit_code"] == 0 and v["attempts"][-1]["resumed_from"] == f"step-{last}" and v["steps"] == 30

    (tmp_path / "other").mkdir()
    other = write_job(tmp_path / "other", {**raw, "training": {**raw["training"], "learning_rate": 2e-2}})
    (out / "final").rename(out / "final.kept")  # checkpoints without final/, of another job: refused
    r = cli("train", other, "--launcher", "local", timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert _last_line(r.stderr).startswith(f"distrib-ft: error: {other}: training.output_dir: ")
    assert "belongs to another job (training.learning_rate: 0.01 there, 0.02 here)" in r.stderr
