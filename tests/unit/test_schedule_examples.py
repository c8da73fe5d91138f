"""The scheduling examples of examples/retrain/schedule/ (docs/scheduling.md): the CronJob YAML has what Kubernetes
needs, the crontab line runs a real `distrib-ft` subcommand and branches on its exit code (run under /bin/sh with
a real flock), the Airflow DAG's decision function on the three outcomes (a pipeline_report.json written by the
real report writer, a round record and a verdict.json shaped as distrib_ft/retrain/pipeline.py and
distrib_ft/runtime/verdict.py write them), and cluster/submit_retrain.py's pure parts."""

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.cli import _parser
from tests.jobs import ROOT

SCHEDULE = ROOT / "examples" / "retrain" / "schedule"
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dag():
    return _load(SCHEDULE / "airflow_dag.py", "retrain_airflow_dag")


@pytest.fixture(scope="module")
def submit():
    return _load(ROOT / "cluster" / "submit_retrain.py", "submit_retrain")


def _check_schedule(expr: str) -> None:
    fields = expr.split()
    assert len(fields) == 5, expr
    for f, (lo, hi) in zip(fields, RANGES):
        assert CRON_FIELD.match(f), (expr, f)
        assert all(lo <= int(n) <= hi for n in re.findall(r"\d+", f.split("/")[0])), (expr, f)


def _retrain_args(argv: list[str]):
    """``argv`` (after ``distrib-ft``) parsed by the real CLI's parser: a real subcommand and real options."""
    args = _parser().parse_args(argv)
    assert args.command == "retrain", argv
    return args


# ----------------------------------------------------------------------------------------------- Kubernetes


def test_cronjob_yaml_has_what_a_cronjob_needs(submit):
    docs = list(yaml.safe_load_all((SCHEDULE / "k8s-cronjob.yaml").read_text()))
    assert len(docs) == 1
    cj = docs[0]
    assert (cj["apiVersion"], cj["kind"]) == ("batch/v1", "CronJob") and cj["metadata"]["name"]
    spec = cj["spec"]
    _check_schedule(spec["schedule"])
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert isinstance(job["backoffLimit"], int) and job["backoffLimit"] >= 1
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it (and OnFailure would retry in place)
    (container,) = pod["containers"]
    assert container["image"] and container["name"]
    # exit 2 (bad input) and 3 (a round refused) fail the Job at once; no retry would change them
    rules = job["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail[0]["onExitCodes"] == {"containerName": container["name"], "operator": "In", "values": [2, 3]}
    # the ConfigMap the script and the pipeline come from is mounted where the command reads them
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) <= set(volumes) and all("configMap" in volumes[n] for n in mounts)
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_API_SERVER_ADDRESS"]["value"].startswith("http") and "fieldRef" in env["JOB_NAME"]["valueFrom"]
    # The command: cluster/submit_retrain.py with arguments its own parser takes, and the entrypoint it submits
    # to Ray is `distrib-ft retrain PIPELINE --address auto`, which the real CLI parses.
    script = container["args"][0]
    line = " ".join(script.replace("\\\n", " ").split("exec ", 1)[1].split())
    argv = shlex.split(line.replace('"$RAY_API_SERVER_ADDRESS"', "http://head:8265").replace('"$JOB_NAME"', "job-1"))
    assert argv[0] == "python" and argv[1] == f"{mounts['config']}/submit_retrain.py"
    args = submit._parser().parse_args(argv[2:])
    assert args.submission_id == "job-1" and args.working_dir and args.pipeline == "pipeline.yaml"
    assert f"{args.working_dir}/" in script.split("exec ", 1)[0]  # the pipeline is copied into the working dir
    words = shlex.split(submit.entrypoint(args.pipeline, args.retrain_args, args.distrib_ft))
    assert words[0] == "distrib-ft"
    r = _retrain_args(words[1:])
    assert (r.pipeline, r.address) == ("pipeline.yaml", "auto")


# --------------------------------------------------------------------------------------------------- crontab


def _cron_lines() -> tuple[dict, list[tuple[str, str]]]:
    env, jobs = {}, []
    for raw in (SCHEDULE / "crontab").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Z_]+)=(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2)
            continue
        fields = line.split(None, 5)
        jobs.append((" ".join(fields[:5]), fields[5]))
    return env, jobs


def test_crontab_line_runs_a_real_subcommand_under_flock():
    env, jobs = _cron_lines()
    assert len(jobs) == 1
    schedule, command = jobs[0]
    _check_schedule(schedule)
    assert env["SHELL"] == "/bin/sh" and ".venv/bin" in env["PATH"] and "MAILTO" in env
    m = re.search(r"flock -n -E 75 (\S+) distrib-ft ([^>;&|]*)>>", command)
    assert m, command
    args = _retrain_args(shlex.split(m.group(2)))
    assert args.pipeline.endswith(".yaml")
    assert "%" not in command.replace(r"\%", "")  # cron turns a bare % into a newline


@pytest.mark.skipif(not shutil.which("flock"), reason="no flock (util-linux) on this machine")
@pytest.mark.parametrize("code", [0, 3, 1])
def test_crontab_line_branches_on_the_exit_code(tmp_path, code):
    """The line itself under /bin/sh (cron's % unescaped, the paths moved under tmp_path), with `distrib-ft` a
    script that prints the pipeline's lines and exits with ``code``: what cron would mail, and the log."""
    _, [(_, command)] = _cron_lines()
    home, log, lock = tmp_path / "srv", tmp_path / "retrain.log", tmp_path / "retrain.lock"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lines = {0: "round r1: promoted v0001 (exit 0 (accepted at step 4): ...)\nPipeline: 1 promoted, none refused; "
                "current v0001; report R/pipeline_report.md",
             3: "round r2: refused v0002: r1 over budget (nll 1.0000 -> 1.5000 > limit 1.1000)\nPipeline: 1 "
                "promoted, r2 refused; current v0001; report R/pipeline_report.md",
             1: "distrib-ft retrain: a job failed\nPipeline: 0 promoted, none refused; current none; report R"}[code]
    fake = bin_dir / "distrib-ft"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = retrain ] || exit 9\ncat <<'EOF'\n{lines}\nEOF\nexit {code}\n")
    fake.chmod(0o755)
    cmd = (command.replace("/srv/distrib-ft", str(home)).replace("/var/log/distrib-ft/retrain.log", str(log))
           .replace("/var/lock/distrib-ft-retrain.lock", str(lock)).replace(r"\%", "%"))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr
    text = log.read_text()
    assert re.match(r"== \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ retrain ==\n", text) and text.endswith(f"exit {code}\n")
    if code == 0:
        assert r.stdout == ""  # nothing to mail
    elif code == 3:
        assert r.stdout.splitlines() == ["distrib-ft retrain: a round was refused (exit 3); production unchanged:",
                                         lines.splitlines()[0], lines.splitlines()[1]]
    else:
        assert r.stdout.startswith("distrib-ft retrain failed (exit 1):") and "a job failed" in r.stdout

    # A run still holding the lock: the next one is skipped (75), silently, and says so in the log.
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"])
    try:
        for _ in range(200):
            if subprocess.run(["flock", "-n", str(lock), "true"]).returncode != 0:
                break
            time.sleep(0.05)
        r = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    finally:
        holder.terminate()
        holder.wait()
    assert r.returncode == 0 and r.stdout == "" and log.read_text().endswith("exit 75\n"), r.stdout


# ---------------------------------------------------------------------------------------------- Airflow DAG


def _registry(tmp_path: Path, code: int, rounds: list[dict], current: str | None) -> Path:
    """A registry folder after a pipeline run: pipeline_report.json from the real writer, plus round records."""
    from distrib_ft.retrain.forgetting import write_report

    reg = tmp_path / "registry"
    tasks = ["r1", "r2", "r3"]
    done = [r for r in rounds if r["decision"] == "promoted"]
    rows = [{"round": r["name"], "version": r["version"],
             "scores": {t: 1.0 + 0.1 * i + 0.2 * j for j, t in enumerate(tasks)}} for i, r in enumerate(done)]
    write_report(reg, {"metric": "nll", "tasks": tasks, "base": {t: 2.0 for t in tasks}, "rows": rows,
                       "exit_code": code, "current": current, "pipeline": str(tmp_path / "pipeline.yaml"),
                       "rounds": [{k: r[k] for k in ("name", "version", "decision", "verdict")} for r in rounds]})
    (reg / "rounds").mkdir(exist_ok=True)
    for r in rounds:
        (reg / "rounds" / f"{r['name']}.json").write_text(json.dumps(r))
    return reg


def _round(tmp_path: Path, name: str, version: str, decision: str, reason: str | None = None) -> dict:
    """A round's record as distrib_ft/retrain/pipeline.py writes it, with its job's verdict.json in output_dir."""
    out = tmp_path / "runs" / name
    out.mkdir(parents=True)
    refused = decision == "refused"
    verdict = {"version": 1, "command": "train", "output_dir": str(out), "exit_code": 3 if refused else 0,
               "decision": "rejected" if refused else "accepted", "final": None if refused else str(out / "final"),
               "rejected": str(out / "rejected") if refused else None, "chosen_step": 4, "steps": 4,
               "metrics": {"eval_loss_start": 2.0, "eval_loss": 1.2,
                           "suites": {"r1": {"metric": "nll", "baseline": 1.0, "value": 1.5 if refused else 1.05,
                                             "step": 4, "within_budget": not refused}}},
               "error": None, "finished": "2026-11-30T03:40:00Z"}
    (out / "verdict.json").write_text(json.dumps(verdict))
    from distrib_ft.runtime.verdict import line

    return {"name": name, "data": {}, "version": version, "decision": decision, "exit_code": verdict["exit_code"],
            "verdict": line(verdict), "output_dir": str(out), "reason": reason, "gate": None}


def test_decide_deploys_the_current_version_on_exit_0(tmp_path, dag):
    rounds = [_round(tmp_path, "r1", "v0001", "promoted"), _round(tmp_path, "r2", "v0002", "promoted")]
    reg = _registry(tmp_path, 0, rounds, "v0002")
    report, record, verdict = dag.load_outcome(str(reg), 0)
    assert report["current"] == "v0002" and record is None and verdict is None
    d = dag.decide(0, report, record, verdict)
    assert (d.action, d.version) == ("deploy", "v0002")
    assert d.message == "every round promoted (r1, r2); deploy v0002"


def test_decide_alerts_with_the_refused_rounds_reason_on_exit_3(tmp_path, dag):
    reason = "r1 over budget (nll 1.0000 -> 1.5000 > limit 1.1000)"
    rounds = [_round(tmp_path, "r1", "v0001", "promoted"), _round(tmp_path, "r2", "v0002", "promoted"),
              _round(tmp_path, "r3", "v0003", "refused", reason)]
    reg = _registry(tmp_path, 3, rounds, "v0002")
    report, record, verdict = dag.load_outcome(str(reg), 3)
    assert record["name"] == "r3" and verdict["decision"] == "rejected"
    d = dag.decide(3, report, record, verdict)
    assert (d.action, d.version, d.round) == ("alert", "v0003", "r3")
    assert d.message.startswith(f"round r3 refused v0003: {reason}; job: exit 3 (rejected at step 4): ")
    assert f"verdict {tmp_path / 'runs' / 'r3' / 'verdict.json'}" in d.message
    assert d.message.endswith("production stays at v0002")
    # without the record's reason (an older record): the suites the verdict has out of budget
    d = dag.decide(3, report, {**record, "reason": None}, verdict)
    assert d.message.startswith("round r3 refused v0003: r1 nll 1.0 -> 1.5; job: ")


@pytest.mark.parametrize("code", [1, 2, 130])
def test_decide_fails_on_every_other_code(tmp_path, dag, code):
    rounds = [_round(tmp_path, "r1", "v0001", "promoted")]
    reg = _registry(tmp_path, code, rounds, "v0001")
    d = dag.decide(code, *dag.load_outcome(str(reg), code))
    assert d.action == "fail" and d.message.startswith(f"distrib-ft retrain exited {code}: ")
    assert dag.decide(code, None).action == "fail"


def test_decide_fails_on_a_report_of_an_earlier_run(tmp_path, dag):
    """A run that wrote no report (bad input, a crash) leaves the last run's: it must not be deployed or alerted
    on again."""
    reg = _registry(tmp_path, 3, [_round(tmp_path, "r1", "v0001", "promoted"),
                                  _round(tmp_path, "r2", "v0002", "refused", "r1 over budget")], "v0001")
    d = dag.decide(0, *dag.load_outcome(str(reg), 0))
    assert d.action == "fail" and "says exit_code 3: the report is from an earlier run" in d.message, d.message
    d = dag.decide(2, *dag.load_outcome(str(reg), 2))
    assert (d.action, d.message) == ("fail", "distrib-ft retrain exited 2: bad input: the pipeline file, a job key "
                                             "or a data file (nothing trained; fix it)")
    assert dag.decide(0, None).action == "fail"  # no report: nothing to deploy


def test_the_examples_name_the_demo_pipeline_and_its_registry(dag):
    """The crontab and the DAG's defaults run examples/retrain/pipeline.yaml from a checkout; the DAG reads the
    registry that file names."""
    pipeline = yaml.safe_load((ROOT / dag.PIPELINE).read_text())
    assert dag.registry_path(home=str(ROOT)) == str(ROOT / pipeline["registry"])
    assert dag.registry_path("s3://b/reg") == "s3://b/reg" and dag.registry_path("/abs/reg") == "/abs/reg"
    _, [(_, command)] = _cron_lines()
    assert f" retrain {dag.PIPELINE} " in command and "cd /srv/distrib-ft &&" in command


def test_dag_file_imports_without_airflow(dag, monkeypatch):
    assert importlib.util.find_spec("airflow") is None and dag.dag is None
    assert dag.submission_id("scheduled__2026-11-30T03:17:00+00:00") == "retrain-scheduled__2026-11-30T03-17-00-00-00"
    monkeypatch.setattr(dag, "RAY_JOBS_ADDRESS", "")
    assert dag.retrain_command()[:2] == ["distrib-ft", "retrain"]
    _retrain_args(dag.retrain_command()[1:])
    monkeypatch.setattr(dag, "RAY_JOBS_ADDRESS", "http://head:8265")
    cmd = dag.retrain_command("retrain-x")
    assert cmd[1].endswith("cluster/submit_retrain.py") and cmd[-3:] == ["--submission-id", "retrain-x", dag.PIPELINE]


# ---------------------------------------------------------------------------------- cluster/submit_retrain.py


def test_submit_retrain_codes_and_attempts(submit):
    assert [submit.job_code(s, c) for s, c in [("SUCCEEDED", 0), ("FAILED", 3), ("FAILED", 2), ("FAILED", 1),
                                                ("FAILED", None), ("FAILED", -9), ("STOPPED", None)]] == \
        [0, 3, 2, 1, 1, 137, 130]
    ids = ["n-1", "n-1.3", "n-10", "n-1.2", "other", "n-1.x"]
    assert submit.attempt_ids(ids, "n-1") == ["n-1", "n-1.2", "n-1.3"]
    assert submit.next_attempt("n-1", ["n-1", "n-1.2"]) == "n-1.3" and submit.next_attempt("n-1", []) == "n-1"
    cmd = submit.entrypoint("my pipe.yaml", ["--round", "r2"], "python -m launcher.cli")
    assert shlex.split(cmd) == ["python", "-m", "launcher.cli", "retrain", "my pipe.yaml", "--address", "auto",
                                "--round", "r2"]
    _retrain_args(shlex.split(cmd)[3:])
