"""The retraining demo's result (issue 12, must-have 8): both settings of examples/retrain/ into fresh registries.

Runs ``distrib-ft retrain`` (distrib_ft/retrain/pipeline.py; docs/retrain.md) on copies of
examples/retrain/pipeline_plain.yaml (a: no replay, no EWC) and examples/retrain/pipeline.yaml (b: carried-forward
replay and online EWC), one after the other, each with its registry, runs and replay buffer in a fresh folder, and
writes bench/results/retrain_demo.json: per setting the pipeline's exit code, wall time, ACC / BWT / FWT and R from
REGISTRY/pipeline_report.json (GEM's definitions on held-out NLL, signs as docs/retrain.md), and per round its
decision, its gate's numbers (new-task NLL at step 0 and at the end = the new-task gain; each retention suite's
NLL, limit and change) and the training child's wall time. The file is rewritten after each setting.

    nice -n 5 .venv/bin/python bench/retrain_demo.py                 # both settings, --launcher local
    nice -n 5 .venv/bin/python bench/retrain_demo.py --settings plain
    nice -n 5 .venv/bin/python bench/retrain_demo.py --parallel      # both at once, one thread each
    .venv/bin/python bench/retrain_demo.py --collect --work DIR       # the results of a run that was stopped
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "retrain"
SETTINGS = {"plain": "pipeline_plain.yaml", "defended": "pipeline.yaml"}


def _abs(value: str, base: Path) -> str:
    return value if "://" in value or value.startswith("offline:") else str((base / value).resolve())


def prepare(setting: str, work: Path, last_overrides: dict | None = None) -> Path:
    """Copies of the setting's pipeline and template job whose outputs all lie under ``work`` (inputs absolute).

    ``last_overrides``: job keys set in the last round's ``overrides`` (e.g. a learning rate that makes it forget).
    """
    spec = yaml.safe_load((EXAMPLE / SETTINGS[setting]).read_text())
    job = yaml.safe_load((EXAMPLE / spec["job"]).read_text())
    job["data"]["train_files"] = [_abs(f, EXAMPLE) for f in job["data"]["train_files"]]
    job["distributed"]["deepspeed"] = _abs(job["distributed"]["deepspeed"], EXAMPLE)
    for suite in job.get("monitor", {}).get("suites", []):
        suite["files"] = [_abs(f, EXAMPLE) for f in suite["files"]]
    job["training"]["output_dir"] = str(work / "runs")
    if job.get("replay"):
        job["replay"]["buffer"] = str(work / "replay")
    work.mkdir(parents=True, exist_ok=False)  # fresh: a registry left from an earlier run would train nothing
    (work / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    spec["registry"] = str(work / "registry")
    spec["job"] = str(work / "job.yaml")
    for r in spec["rounds"]:
        r["train_files"] = [_abs(f, EXAMPLE) for f in r["train_files"]]
        r["eval_files"] = [_abs(f, EXAMPLE) for f in r["eval_files"]]
    if last_overrides:
        spec["rounds"][-1]["overrides"] = {**spec["rounds"][-1].get("overrides", {}), **last_overrides}
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _round(rec: dict, seconds: float | None) -> dict:
    gate = rec.get("gate") or {}
    nt = gate.get("new_task") or {}
    gain = (nt["baseline"] - nt["value"]) if nt.get("baseline") is not None and nt.get("value") is not None else None
    suites = {n: {"baseline": s.get("baseline"), "value": s.get("value"), "limit": s.get("limit"),
                  "relative_change": (s["value"] / s["baseline"] - 1) if s.get("baseline") and s.get("value")
                  is not None else None, "within_budget": s.get("within_budget")}
              for n, s in (gate.get("suites") or {}).items()}
    return {"name": rec["name"], "version": rec["version"], "decision": rec["decision"], "reason": rec.get("reason"),
            "verdict": rec.get("verdict"), "new_task_nll_start": nt.get("baseline"),
            "new_task_nll_end": nt.get("value"),
            "new_task_gain_nll": gain, "new_task_gain_relative": gain / nt["baseline"] if gain is not None and
            nt.get("baseline") else None, "gate_step": gate.get("step"), "suites": suites, "train_seconds": seconds}


def start(setting: str, work: Path, launcher: str, threads: int | None, last_overrides: dict | None = None) -> dict:
    """Start ``distrib-ft retrain`` on a fresh copy of the setting's pipeline; the running state."""
    pipeline = prepare(setting, work, last_overrides)
    cmd = [sys.executable, "-m", "launcher.cli", "retrain", str(pipeline), "--launcher", launcher]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    out, err = open(work / "stdout.txt", "w"), open(work / "stderr.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env)
    return {"setting": setting, "work": work, "pipeline": pipeline, "proc": proc, "files": (out, err),
            "began": time.time(), "load_before": os.getloadavg(), "threads": threads}


def collect(setting: str, work: Path, *, code: int | None = None, wall: float | None = None,
            load_before=None, threads: int | None = None) -> dict:
    """The setting's results from its work folder (also of a run that was stopped: the rounds that finished)."""
    pipeline = work / "pipeline.yaml"
    stdout = (work / "stdout.txt").read_text()
    stderr = (work / "stderr.txt").read_text()
    train_s = {m[0]: float(m[1]) for m in re.findall(r"round (\S+): the job ended with exit \d+ after (\d+) s", stderr)}
    registry = work / "registry"
    report = json.loads((registry / "pipeline_report.json").read_text()) if (registry / "pipeline_report.json"
                                                                              ).is_file() else {}
    rounds = []
    for r in yaml.safe_load(pipeline.read_text())["rounds"]:
        rec_file = registry / "rounds" / f"{r['name']}.json"
        if rec_file.is_file():
            rounds.append(_round(json.loads(rec_file.read_text()), train_s.get(r["name"])))
    return {"setting": setting, "pipeline": str(EXAMPLE / SETTINGS[setting]), "exit_code": code,
            "wall_seconds": round(wall, 1) if wall is not None else None, "omp_num_threads": threads,
            "load_average_before": [round(x, 2) for x in load_before] if load_before else None,
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "ACC": report.get("ACC"),
            "BWT": report.get("BWT"), "FWT": report.get("FWT"), "T": report.get("T"), "R": report.get("R"),
            "tasks": report.get("tasks"), "rows": report.get("rows"), "base": report.get("base"),
            "current": report.get("current"), "rounds": rounds,
            "stdout": [line for line in stdout.splitlines() if line], "work": str(work)}


def finish(state: dict) -> dict:
    """Wait for a started setting; its results."""
    code = state["proc"].wait()
    for f in state["files"]:
        f.close()
    res = collect(state["setting"], state["work"], code=code, wall=time.time() - state["began"],
                  load_before=state["load_before"], threads=state["threads"])
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return res


def main(argv: list[str] | None = None) -> int:
    """Run the settings one after the other; write the JSON after each."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="plain,defended", help="comma-separated: plain, defended (in this order)")
    ap.add_argument("--work", type=Path,
                    default=ROOT / "outputs" / "retrain_demo_bench" / time.strftime("%Y%m%dT%H%M%S"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "retrain_demo.json")
    ap.add_argument("--launcher", choices=["local", "ray"], default="local")
    ap.add_argument("--parallel", action="store_true", help=(
        "run the settings at once, each with OMP_NUM_THREADS=1 (the threads one run takes by default on 2 cores)"))
    ap.add_argument("--collect", action="store_true", help="only read the settings' results from --work")
    ap.add_argument("--last-round", nargs="*", default=[], metavar="KEY=VALUE", help=(
        "overrides of the last round (YAML values), e.g. training.learning_rate=3.0e-3: a round built to forget"))
    args = ap.parse_args(argv)
    results = {"command": " ".join(["bench/retrain_demo.py", *(argv if argv is not None else sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "launcher": args.launcher,
               "cpus": os.cpu_count(), "settings": {}}
    if args.out.is_file():  # keep the settings of an earlier invocation that this one does not rerun
        results["settings"] = json.loads(args.out.read_text()).get("settings", {})

    def save(res: dict) -> None:
        results["settings"][res["setting"]] = res
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.out)
        print(f"retrain_demo: {res['setting']}: exit {res['exit_code']} in {res['wall_seconds']} s; ACC {res['ACC']} "
              f"BWT {res['BWT']} FWT {res['FWT']}; " + ", ".join(f"{r['name']} {r['decision']}" for r in res["rounds"]),
              flush=True)

    settings = args.settings.split(",")
    last = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.last_round)}
    results["last_round_overrides"] = last
    if args.collect:
        for setting in settings:
            save(collect(setting, args.work / setting))
    elif args.parallel:
        states = [start(s, args.work / s, args.launcher, 1, last) for s in settings]
        for st in states:
            save(finish(st))
    else:
        for setting in settings:
            print(f"retrain_demo: {setting} ...", flush=True)
            save(finish(start(setting, args.work / setting, args.launcher, None, last)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
