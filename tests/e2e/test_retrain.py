"""``distrib-ft retrain`` end to end through the real CLI (issue 12, must-haves 5 and 7), ``--launcher local``.

Three rounds of full fine-tuning of the tiny model, one toy skill each (tests/retrain_data.py): convert, join,
spell. Rounds 1 and 2 (24 steps, learning rate 2e-3) each learn their skill and keep the earlier ones within the
retention budget (10%); round 3 has ``training.learning_rate: 3.0e-2`` in its ``overrides`` and forgets (measured
with ``distrib-ft train`` jobs built as the design says: round 2 moves convert's NLL +1.6%; round 3 moves convert
+105% and join +113% while its own task improves 6.0 -> 2.2), so its gate refuses it: exit 3, ``current`` stays
at round 2's version.

One pipeline is run once per module (the ``pipeline`` fixture) and killed on the way: SIGKILL to its process group
once round 2 has written its first checkpoint, then submitted again, which resumes round 2 from that checkpoint and
finishes the pipeline. Each test checks one scenario on that finished registry: the decisions and the registry,
the round jobs the pipeline built, the resumed round, R against separate ``distrib-ft eval`` runs, a re-run that
trains nothing, a changed data file (exit 2), rollback (on a copy of the registry). A second, shorter pipeline
(the demo's LoRA + EWC + replay template, two rounds) checks the chain: round 2 trains on the base with round 1's
adapter merged, reads its Fisher and replays its buffer version, and R's row equals ``distrib-ft eval`` with both
adapters. A one-round pipeline stopped by Ctrl-C (SIGINT to its process group) mid-round checks that the round's line
says interrupted, the summary and pipeline_report.json are written and the exit code is 130 (53 s). The file took
471 s on 2 cores at load 11 before that test (the killed-and-resumed pipeline 209 s, the LoRA pipeline 178 s,
88 s alone; two eval runs 47 s); the round's training itself is ~1 s of each round's ~50 s (process start-up, the
job's checks, the R row's eval job).
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_cli import CLI, assert_one_line_error, clean_env, cli
from tests.jobs import ROOT
from tests.retrain_data import skill_files

ROUNDS = [("r1", "convert"), ("r2", "join"), ("r3", "spell")]
STEPS, LR, FORGET_LR, BUDGET = 24, 2e-3, 3e-2, 0.10


def _listing(registry) -> list[tuple]:
    r = cli("registry", "list", registry, "--json", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return [(v["version"], v["round"], v["decision"], v["current"]) for v in json.loads(r.stdout)]


def _round_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("round ")]


def _loss_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _tree_state(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its mtime (ns): what a run that trains nothing must leave as it is."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir):
    """The three-round pipeline, killed once in round 2 and run again to its end; what the tests read."""
    tmp = tmp_path_factory.mktemp("retrain")
    files = skill_files(tmp / "data", n_train=64, n_eval=8)
    runs, registry = tmp / "runs", tmp / "registry"
    template = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "method": {"type": "full"},
        "data": {"train_files": [str(files["convert"][0])], "max_seq_length": 64},
        "training": {"output_dir": str(runs), "max_steps": STEPS, "per_device_train_batch_size": 4,
                     "learning_rate": LR, "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 2,
                     "save_total_limit": 2, "bf16": False, "seed": 0},
        "distributed": {"num_workers": 1, "deepspeed": str(ROOT / "ds_configs" / "zero2.json")},
    }
    (tmp / "job.yaml").write_text(yaml.safe_dump(template))
    rounds = [{"name": name, "train_files": [str(files[skill][0])], "eval_files": [str(files[skill][1])]}
              for name, skill in ROUNDS]
    rounds[2]["overrides"] = {"training.learning_rate": FORGET_LR}  # built to forget
    spec = {"registry": str(registry), "base_model": str(tiny_model_dir), "job": "job.yaml",  # relative: the file's
            "retention_budget": BUDGET, "rounds": rounds}                                   # folder
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))

    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    began = time.time()
    p = subprocess.Popen([*CLI, "retrain", str(path), "--launcher", "local"], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    first = runs / "r2" / "checkpoints" / "step-2" / "COMPLETE"
    deadline = time.time() + 600
    while not first.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    killed = p.poll() is None
    if killed:
        os.killpg(p.pid, signal.SIGKILL)  # the pipeline and its round's train process: a node lost
    out, err = p.communicate(timeout=60)
    r2 = runs / "r2"
    kill = {"killed": killed, "returncode": p.returncode, "stdout": out, "stderr": err,
            "r2_verdict": (r2 / "verdict.json").exists(), "r2_record": (registry / "rounds" / "r2.json").exists(),
            "listing": _listing(registry) if killed and (registry / "current.json").exists() else None,
            "checkpoints": sorted(int(c.name.removeprefix("step-")) for c in (r2 / "checkpoints").glob("step-*")
                                  if (c / "COMPLETE").exists()) if killed else [],
            "r1_state": _tree_state(runs / "r1") if (runs / "r1").exists() else {}}
    resumed = cli("retrain", path, "--launcher", "local", timeout=900)
    return {"tmp": tmp, "files": files, "runs": runs, "registry": registry, "path": path, "kill": kill,
            "run": resumed, "seconds": time.time() - began}


def test_rounds_1_and_2_promote_round_3_is_refused(pipeline):
    r, runs, registry = pipeline["run"], pipeline["runs"], pipeline["registry"]
    assert r.returncode == 3, r.stderr[-3000:]
    lines = _round_lines(r.stdout)
    assert [line.split(" (")[0].split(":")[0:2] for line in lines] == [
        ["round r1", " promoted v0001"], ["round r2", " promoted v0002"], ["round r3", " refused v0003"]], r.stdout
    assert "r1 over budget" in lines[2] and "r2 over budget" in lines[2], lines[2]  # the gate's reason
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("Pipeline: 2 promoted, r3 refused; current v0002; report "), r.stdout
    assert last.endswith("pipeline_report.md") and (registry / "pipeline_report.md").exists(), last

    assert _listing(registry) == [("v0001", "r1", "promoted", False), ("v0002", "r2", "promoted", True),
                                  ("v0003", "r3", "refused", False)]
    shown = json.loads(cli("registry", "show", registry, "v3", "--json", timeout=120).stdout)
    assert shown["parent"] == "v0002" and shown["decision"] == "refused" and not shown["current"]
    # the current version's model is round 2's final/, byte for byte
    assert (registry / "versions" / "v0002" / "model" / "model.safetensors").read_bytes() == \
        (runs / "r2" / "final" / "model.safetensors").read_bytes()

    verdicts = {name: json.loads((runs / name / "verdict.json").read_text()) for name, _ in ROUNDS}
    assert [(v["exit_code"], v["decision"]) for v in verdicts.values()] == [(0, "accepted"), (0, "accepted"),
                                                                            (3, "rejected")]
    breached = {k for k, s in verdicts["r3"]["metrics"]["suites"].items() if not s["within_budget"]}
    assert breached == {"r1", "r2"}, verdicts["r3"]["metrics"]["suites"]
    for name, _ in ROUNDS:  # every round learned its own task: the refusal is forgetting alone
        new_task = json.loads((runs / name / "report.json").read_text())["new_task"]
        assert new_task["evaluations"][-1]["value"] < new_task["baseline"], name

    report = json.loads((registry / "pipeline_report.json").read_text())
    assert (report["exit_code"], report["current"]) == (3, "v0002")
    assert [(x["name"], x["version"], x["decision"]) for x in report["rounds"]] == [
        ("r1", "v0001", "promoted"), ("r2", "v0002", "promoted"), ("r3", "v0003", "refused")]
    print(f"pipeline (killed once, resumed) took {pipeline['seconds']:.0f} s")


def test_round_jobs_start_from_the_current_version_with_earlier_rounds_as_suites(pipeline, tiny_model_dir):
    """What rounds.py built, read back from each version's resolved job (the registry records it)."""
    registry, files = pipeline["registry"], pipeline["files"]
    jobs = {}
    for v in ("v1", "v2", "v3"):
        r = cli("registry", "show", registry, v, "--json", timeout=120)
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)
        jobs[shown["round"]] = yaml.safe_load(shown["job"])
    weights = registry / "versions" / "v{:04d}" / "model" / "model.safetensors"
    assert jobs["r1"]["model"]["name_or_path"] == str(tiny_model_dir)  # round 1 starts at base_model
    for name, parent in (("r2", 1), ("r3", 2)):  # later rounds: a copy of the current version's model
        start = Path(jobs[name]["model"]["name_or_path"]) / "model.safetensors"
        assert start.read_bytes() == Path(str(weights).format(parent)).read_bytes(), name
    suites = {name: [(s["name"], s["files"], s.get("metric", "nll"), s["max_relative_increase"])
                     for s in job.get("monitor", {}).get("suites", [])] for name, job in jobs.items()}
    assert suites == {"r1": [],
                      "r2": [("r1", [str(files["convert"][1])], "nll", BUDGET)],
                      "r3": [("r1", [str(files["convert"][1])], "nll", BUDGET),
                             ("r2", [str(files["join"][1])], "nll", BUDGET)]}
    assert [jobs[n]["data"]["train_files"] for n, _ in ROUNDS] == [[str(files[s][0])] for _, s in ROUNDS]
    assert [jobs[n]["training"]["learning_rate"] for n, _ in ROUNDS] == [LR, LR, FORGET_LR]
    assert [jobs[n]["training"]["output_dir"] for n, _ in ROUNDS] == [str(pipeline["runs"] / n) for n, _ in ROUNDS]


def test_a_round_killed_midway_resumes_from_its_checkpoint(pipeline):
    kill, r, runs = pipeline["kill"], pipeline["run"], pipeline["runs"]
    assert kill["killed"], f"the pipeline ended before round 2's first checkpoint:\n{kill['stderr'][-3000:]}"
    assert kill["returncode"] == -signal.SIGKILL
    assert not kill["r2_verdict"] and not kill["r2_record"], "round 2 had finished when it was killed"
    assert kill["listing"] == [("v0001", "r1", "promoted", True)]  # round 1 done, round 2 not added
    last = kill["checkpoints"][-1]
    assert 2 <= last < STEPS
    assert f"resuming it from step-{last}" in r.stderr, r.stderr[-3000:]
    steps = _loss_steps(runs / "r2")
    assert steps[-1] == STEPS and [s for s in steps if s > last] == list(range(last + 1, STEPS + 1)), steps
    assert steps.count(1) == 1, steps  # continued, not restarted
    v = json.loads((runs / "r2" / "verdict.json").read_text())
    assert v["attempts"][-1]["resumed_from"] == f"step-{last}" and v["steps"] == STEPS
    assert _tree_state(runs / "r1") == kill["r1_state"]  # round 1 was not trained again
    assert "round r1: promoted v0001" in r.stdout


def test_r_equals_separate_eval_runs_of_the_same_models(pipeline, tiny_model_dir):
    registry, files, tmp = pipeline["registry"], pipeline["files"], pipeline["tmp"]
    report = json.loads((registry / "pipeline_report.json").read_text())
    tasks = [name for name, _ in ROUNDS]
    assert report["tasks"] == tasks and report["metric"] == "nll"
    assert len(report["R"]) == 2 and all(len(row) == 3 for row in report["R"])  # rows: the promoted rounds
    R, base = report["R"], [report["base"][t] for t in tasks]
    # GEM (lower is better: BWT and FWT negated, ACC the mean NLL), from R itself
    assert report["ACC"] == pytest.approx((R[1][0] + R[1][1]) / 2, rel=1e-9)
    assert report["BWT"] == pytest.approx(R[0][0] - R[1][0], rel=1e-9)
    assert report["FWT"] == pytest.approx(base[1] - R[0][1], rel=1e-9)
    assert R[0][0] < base[0] and R[1][1] < base[1]  # each round learned its task
    # Round k starts from the model current after round k-1: its step-0 values (every earlier round's suite, its
    # own new task) are row k-1 of R, measured by the training job's own monitor.
    runs = pipeline["runs"]
    for k in (1, 2):
        rep = json.loads((runs / tasks[k] / "report.json").read_text())
        start = [rep["suites"][t]["baseline"] for t in tasks[:k]] + [rep["new_task"]["baseline"]]
        assert start == pytest.approx(R[k - 1][:k + 1], rel=1e-5), tasks[k]

    raw = yaml.safe_load((tmp / "job.yaml").read_text())
    raw["training"]["output_dir"] = str(tmp / "eval-runs")
    raw["monitor"] = {"suites": [{"name": name, "files": [str(files[skill][1])], "metric": "nll"}
                                 for name, skill in ROUNDS]}
    job = tmp / "eval-job.yaml"
    job.write_text(yaml.safe_dump(raw))
    for i, version in enumerate(("v0001", "v0002")):
        out = tmp / f"eval-{version}"
        r = cli("eval", job, "--model", registry / "versions" / version / "model", "--out", out,
                "--launcher", "local")
        assert r.returncode == 0, r.stderr[-3000:]
        suites = json.loads((out / "report.json").read_text())["suites"]
        assert [suites[t]["baseline"] for t in tasks] == pytest.approx(base, rel=1e-5)
        assert [suites[t]["evaluations"][-1]["value"] for t in tasks] == pytest.approx(R[i], rel=1e-5), version


def test_a_rerun_trains_nothing_and_exits_the_same(pipeline):
    runs, registry, first = pipeline["runs"], pipeline["registry"], pipeline["run"]
    before_runs, before_versions = _tree_state(runs), _listing(registry)
    r = cli("retrain", pipeline["path"], "--launcher", "local", timeout=300)
    assert r.returncode == first.returncode == 3, r.stderr[-3000:]
    assert _round_lines(r.stdout) == _round_lines(first.stdout), (r.stdout, first.stdout)
    assert r.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]
    assert _tree_state(runs) == before_runs  # no checkpoint, metric or verdict written
    assert _listing(registry) == before_versions  # no version added, current unchanged


def test_a_changed_data_file_under_an_existing_round_name_is_exit_2(pipeline):
    runs, registry = pipeline["runs"], pipeline["registry"]
    train = pipeline["files"]["join"][0]
    kept = train.read_bytes()
    before_runs, before_versions = _tree_state(runs), _listing(registry)
    try:
        train.write_bytes(kept + b'{"instruction": "join cloud and table", "input": "", "output": "cloud-table"}\n')
        r = cli("retrain", pipeline["path"], "--launcher", "local", timeout=300)
    finally:
        train.write_bytes(kept)
    assert_one_line_error(r, "rounds[1] (r2)", str(train), "changed since the round ran")
    assert _tree_state(runs) == before_runs and _listing(registry) == before_versions


def test_rollback_after_the_pipeline(pipeline, tmp_path):
    copy = tmp_path / "registry"
    shutil.copytree(pipeline["registry"], copy)
    r = cli("registry", "rollback", copy, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("v0001 (current)"), r.stderr[-3000:]
    assert _listing(copy) == [("v0001", "r1", "promoted", True), ("v0002", "r2", "promoted", False),
                              ("v0003", "r3", "refused", False)]
    r = cli("registry", "rollback", copy, "--to", "v2", timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("v0002 (current)"), r.stderr[-3000:]


def test_merge_back_promotes_the_largest_alpha_within_budget(pipeline, tmp_path):
    """The refused round 3 given a new name and ``merge_back: true`` (the documented way past a refusal: remove the
    refused round, append a new one): its candidate breaks both suites, so theta0 + alpha (theta - theta0) is tried
    for alpha in 0.5, 0.2, 0.05 (largest first) and the first within budget whose new task still beats its start is
    promoted as v0004, its table in the registry; R's new row keeps r1 and r2 within the budget of round 3's start."""
    registry = tmp_path / "registry"
    shutil.copytree(pipeline["registry"], registry)
    template = yaml.safe_load((pipeline["tmp"] / "job.yaml").read_text())
    template["training"]["output_dir"] = str(tmp_path / "runs")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(template))
    spec = yaml.safe_load(pipeline["path"].read_text())
    spec.update(registry=str(registry), merge_back=True, merge_back_alphas=[0.5, 0.2, 0.05])
    spec["rounds"][2]["name"] = "r3_mb"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    r = cli("retrain", path, "--launcher", "local", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = _round_lines(r.stdout)
    assert lines[-1].startswith("round r3_mb: promoted v0004") and "merged back at alpha" in lines[-1], r.stdout
    assert _listing(registry)[-1] == ("v0004", "r3_mb", "promoted", True)
    mb = json.loads(cli("registry", "show", registry, "v4", "--json", timeout=120).stdout)["metrics"]["merge_back"]
    table = mb["table"]
    assert mb["alpha"] in (0.5, 0.2, 0.05) and table[-1]["alpha"] == mb["alpha"], mb
    assert [row["alpha"] for row in table] == [0.5, 0.2, 0.05][:len(table)]  # largest first, stops at the pass
    assert table[-1]["within_budget"] and table[-1]["new_task_better"]
    assert all(not (row["within_budget"] and row["new_task_better"]) for row in table[:-1])
    report = json.loads((registry / "pipeline_report.json").read_text())
    assert report["rounds"][-1]["name"] == "r3_mb" and len(report["R"]) == 3
    for j in (0, 1):  # r1 and r2 on the merged-back model: within the budget of round 3's start (R's row of r2)
        assert report["R"][2][j] <= report["R"][1][j] * (1 + BUDGET), report["R"]
    assert report["R"][2][2] < report["R"][1][2]  # the new task still better than at its start


def test_lora_rounds_chain_the_adapters_of_the_lineage(tmp_path, tiny_model_dir):
    """LoRA with the demo's template (examples/retrain/job.yaml: EWC-LoRA and replay carried forward) on the tiny
    model: round 2 trains a fresh adapter on the base with round 1's adapter merged (method.merge_adapters), reads
    round 1's Fisher (ewc.fisher_path) and replays the buffer version that round 1's promotion added; R's row for
    v0002 is that chain: equal to ``distrib-ft eval --model v0001 --model v0002``. Two rounds of 6 steps at learning
    rate 5e-2."""
    files = skill_files(tmp_path / "data", n_train=64, n_eval=8)
    registry = tmp_path / "registry"
    template = yaml.safe_load((ROOT / "examples" / "retrain" / "job.yaml").read_text())
    template["model"] = {"name_or_path": str(tiny_model_dir)}
    template["data"].update(train_files=[str(files["convert"][0])], max_seq_length=64)
    template["training"].update(output_dir=str(tmp_path / "runs"), max_steps=6, per_device_train_batch_size=4,
                                learning_rate=5e-2, warmup_ratio=0.0, logging_steps=1, seed=0)
    template["distributed"] = {"num_workers": 1, "deepspeed": str(ROOT / "ds_configs" / "zero2.json")}
    template["replay"]["buffer"] = str(tmp_path / "replay")
    template["ewc"]["fisher_max_sequences"] = 8
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(template))
    rounds = [{"name": name, "train_files": [str(files[skill][0])], "eval_files": [str(files[skill][1])]}
              for name, skill in ROUNDS[:2]]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"registry": str(registry), "base_model": str(tiny_model_dir),
                                    "job": "job.yaml", "retention_budget": BUDGET, "rounds": rounds}))
    r = cli("retrain", path, "--launcher", "local", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("Pipeline: 2 promoted, none refused; current v0002"), r.stdout
    assert _listing(registry) == [("v0001", "r1", "promoted", False), ("v0002", "r2", "promoted", True)]
    adapters = [registry / "versions" / v / "model" for v in ("v0001", "v0002")]
    assert all((a / "adapter_model.safetensors").exists() for a in adapters)
    job = yaml.safe_load(json.loads(cli("registry", "show", registry, "v2", "--json", timeout=120).stdout)["job"])
    assert job["model"]["name_or_path"] == str(tiny_model_dir)
    assert [Path(a).resolve() for a in job["method"]["merge_adapters"]] == [adapters[0].resolve()]
    assert Path(job["ewc"]["fisher_path"]).read_bytes() == (adapters[0] / "fisher.safetensors").read_bytes()
    assert job["replay"]["version"] == 1  # the sample of round 1's data added after its promotion
    assert (adapters[1] / "fisher.safetensors").exists()  # online EWC: the next round's Fisher
    from distrib_ft.data import replay_buffer as rb

    assert rb.list_versions(str(tmp_path / "replay"))[-1] == 2  # round 2's data added after its promotion

    report = json.loads((registry / "pipeline_report.json").read_text())
    R = report["R"]
    rep = json.loads((tmp_path / "runs" / "r2" / "report.json").read_text())  # round 2's start: base + adapter 1
    assert [rep["suites"]["r1"]["baseline"], rep["new_task"]["baseline"]] == pytest.approx(R[0][:2], rel=1e-5)
    assert rep["new_task"]["evaluations"][-1]["value"] < rep["new_task"]["baseline"]

    raw = {**{k: template[k] for k in ("model", "method", "data", "distributed")},
           "training": {**template["training"], "output_dir": str(tmp_path / "eval-runs")},
           "monitor": {"suites": [{"name": name, "files": [str(files[skill][1])], "metric": "nll"}
                                  for name, skill in ROUNDS[:2]]}}
    (tmp_path / "eval-job.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "eval"
    r = cli("eval", tmp_path / "eval-job.yaml", "--model", adapters[0], "--model", adapters[1], "--out", out,
            "--launcher", "local")
    assert r.returncode == 0, r.stderr[-3000:]
    suites = json.loads((out / "report.json").read_text())["suites"]
    assert [suites[t]["evaluations"][-1]["value"] for t in ("r1", "r2")] == pytest.approx(R[1], rel=1e-5)
    assert [suites[t]["baseline"] for t in ("r1", "r2")] == pytest.approx([report["base"][t] for t in ("r1", "r2")],
                                                                          rel=1e-5)


def test_ctrl_c_ends_the_pipeline_as_interrupted_with_its_summary_and_report(tmp_path, tiny_model_dir):
    """SIGINT to the pipeline's process group (a terminal's Ctrl-C) while its round trains: the round's line says
    interrupted, the summary line and pipeline_report.json are written, exit 130 (issue 12, a new user's report).

    A real round (the tiny model, full fine-tuning, ``--launcher local``) with more steps than it gets to run.
    """
    files = skill_files(tmp_path / "data", n_train=64, n_eval=8)
    runs, registry = tmp_path / "runs", tmp_path / "registry"
    template = {"model": {"name_or_path": str(tiny_model_dir)}, "method": {"type": "full"},
                "data": {"train_files": [str(files["convert"][0])], "max_seq_length": 64},
                "training": {"output_dir": str(runs), "max_steps": 100000, "per_device_train_batch_size": 4,
                             "learning_rate": LR, "logging_steps": 1, "save_steps": 100000, "bf16": False},
                "distributed": {"num_workers": 1, "deepspeed": str(ROOT / "ds_configs" / "zero2.json")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(template))
    spec = {"registry": str(registry), "base_model": str(tiny_model_dir), "job": "job.yaml",
            "retention_budget": BUDGET, "rounds": [{"name": "long", "train_files": [str(files["convert"][0])],
                                                    "eval_files": [str(files["convert"][1])]}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    began = time.time()
    # a background job of a non-interactive shell ignores SIGINT, and so would its children: restore the default
    p = subprocess.Popen([*CLI, "retrain", str(path), "--launcher", "local"], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    metrics = runs / "long" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None and not (
            metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-3000:]
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the pipeline and its round's train process
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    lines = out.strip().splitlines()
    assert lines[0].startswith("round long: interrupted (exit 130)"), out
    assert "failed" not in lines[0], lines[0]
    assert lines[-1].startswith("Pipeline: 0 promoted, long interrupted; current none; report "), out
    report = json.loads((registry / "pipeline_report.json").read_text())
    assert report["exit_code"] == 130 and report["current"] is None
    assert json.loads((runs / "long" / "verdict.json").read_text())["decision"] == "interrupted"
    assert not (registry / "rounds" / "long.json").exists()  # no decision: the round runs again next time
    print(f"interrupted pipeline took {time.time() - began:.0f} s")
