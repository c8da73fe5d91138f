"""verdict.json (distrib_ft/runtime/verdict.py) and `distrib-ft status`, without a training loop."""

import json
import time

import pytest

from distrib_ft.config import config_from_dict
from distrib_ft.runtime import verdict as vd
from launcher.cli import main
from tests.jobs import job_dict, set_in


def _config(tmp_path, source="job.yaml", **training):
    raw = job_dict(tmp_path, tmp_path / "model", **training)
    return config_from_dict(raw, source=str(tmp_path / source))


REPORT = {"decision": "rolled_back", "exit_code": 0, "chosen_step": 2,
          "suites": {"old": {"metric": "nll", "kind": "loss", "baseline": 2.0,
                             "evaluations": [{"step": 0, "value": 2.0, "within_budget": True},
                                             {"step": 2, "value": 2.05, "within_budget": True},
                                             {"step": 4, "value": 2.9, "within_budget": False}]}},
          "new_task": {"baseline": 3.0, "gain": 1.0}}


def test_an_accepted_run_records_code_decision_paths_metrics_and_one_attempt(tmp_path):
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    summary = {"final": str(out / "final"), "decision": "rolled_back", "exit_code": 0, "chosen_step": 2, "steps": 4,
               "eval_loss_start": 3.0, "eval_loss": 2.0}
    began = time.time() - 5
    v = vd.build(command="train", config=cfg, output_dir=out, exit_code=0, started="2026-01-01T00:00:00Z",
                 began=began, summary=summary, report=REPORT)
    path = vd.write(out, v)
    assert path == out / "verdict.json" and not list(out.glob(".verdict.json.*"))  # no temp file left
    back = vd.read(out)
    assert back == json.loads(path.read_text()) == v
    assert (back["exit_code"], back["decision"], back["final"], back["rejected"]) == (0, "rolled_back",
                                                                                     str(out / "final"), None)
    assert back["metrics"]["eval_loss_start"] == 3.0 and back["metrics"]["eval_loss"] == 2.0
    # the suite's value at the chosen step (2), not the last evaluation (4)
    assert back["metrics"]["suites"]["old"] == {"metric": "nll", "baseline": 2.0, "value": 2.05, "step": 2,
                                                "within_budget": True}
    assert [a["exit_code"] for a in back["attempts"]] == [0] and back["started"] == "2026-01-01T00:00:00Z"
    assert back["seconds"] >= 5 and back["job"] == str(tmp_path / "job.yaml")
    assert vd.line(back).startswith(f"exit 0 (rolled_back at step 2): {out / 'final'}; eval_loss 3.0000 -> 2.0000")


def test_job_identity_ignores_where_the_file_lay_but_not_any_setting(tmp_path):
    a = _config(tmp_path, "a.yaml")
    assert vd.job_sha256(a) == vd.job_sha256(_config(tmp_path, "b.yaml"))
    assert vd.job_sha256(a) != vd.job_sha256(_config(tmp_path, "a.yaml", logging_steps=2))


def test_a_failure_keeps_the_first_line_and_earlier_attempts(tmp_path):
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    first = vd.build(command="train", config=cfg, output_dir=out, exit_code=1, started="t1", began=time.time(),
                     decision="failed", error="RuntimeError: boom\n  more detail")
    assert first["error"] == "RuntimeError: boom" and first["final"] is None and first["decision"] == "failed"
    second = vd.build(command="train", config=cfg, output_dir=out, exit_code=3, started="t2", began=time.time(),
                      summary={"final": str(out / "rejected"), "decision": "rejected", "steps": 4},
                      resumed_from="step-2", earlier=first)
    assert second["started"] == "t1" and [a["exit_code"] for a in second["attempts"]] == [1, 3]
    assert second["attempts"][1]["resumed_from"] == "step-2" and second["rejected"] == str(out / "rejected")
    assert second["error"] is None and second["final"] is None


def _run_status(capsys, *args):
    code = main(["status", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("code, decision", [(0, "accepted"), (3, "rejected"), (1, "failed"), (130, "interrupted")])
def test_status_prints_the_verdict_and_exits_with_the_jobs_code(tmp_path, capsys, code, decision):
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    where = {0: {"final": str(out / "final")}, 3: {"final": str(out / "rejected")}}.get(code, {})
    vd.write(out, vd.build(command="train", config=cfg, output_dir=out, exit_code=code, started="t",
                           began=time.time(), summary={**where, "decision": decision} if where else None,
                           decision=None if where else decision, report=REPORT if where else None,
                           error=None if where else "RuntimeError: boom"))
    got, stdout, _ = _run_status(capsys, out)
    assert got == code
    assert stdout.startswith(f"Verdict {out / 'verdict.json'}: exit {code} ({decision}")
    assert "attempts: 1" in stdout
    if code == 3:
        assert f"rejected (out of the forgetting budget): {out / 'rejected'}" in stdout
    if code == 1:
        assert "error: RuntimeError: boom" in stdout
    got, stdout, _ = _run_status(capsys, out, "--json")
    assert got == code and json.loads(stdout) == vd.read(out)


def test_status_without_a_verdict_is_one_line_exit_2(tmp_path, capsys):
    code, stdout, stderr = _run_status(capsys, tmp_path)
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines() == [f"distrib-ft: error: {tmp_path}: no verdict.json (the job has not ended, "
                                           "or never ran with this output_dir)"]
    (tmp_path / "verdict.json").write_text("{not json")
    code, _, stderr = _run_status(capsys, tmp_path)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "not a verdict (invalid JSON" in stderr


def test_a_finished_job_submitted_again_is_not_trained_and_exits_with_its_code(tmp_path, tiny_model_dir, capsys):
    """The short-circuit of `distrib-ft train` runs before any worker: no training, the recorded exit code."""
    import yaml

    from distrib_ft.config import load_config
    from distrib_ft.job import resolve

    raw = job_dict(tmp_path, tiny_model_dir)
    set_in(raw, "training.max_steps", 2)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    cfg = resolve(load_config(job_file, [])).config
    out = tmp_path / "out"
    (out / "rejected").mkdir(parents=True)
    v = vd.write(out, vd.build(command="train", config=cfg, output_dir=out, exit_code=3, started="t",
                               began=time.time(), summary={"final": str(out / "rejected"), "decision": "rejected"}))
    code = main(["train", str(job_file), "--launcher", "local"])
    stdout = capsys.readouterr().out
    assert code == 3
    assert stdout.splitlines() == [f"already finished: {vd.line(vd.read(out))}", f"Verdict: {v}"]
    assert not (out / "metrics.jsonl").exists()  # nothing ran
    # the same folder, another setting: the run there is not this job's
    code = main(["train", str(job_file), "--launcher", "local", "training.max_steps=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"distrib-ft: error: {job_file}: training.output_dir: {out} already holds a finished run (final/) of this "
        "job with other settings; use --resume, or another output_dir"]
