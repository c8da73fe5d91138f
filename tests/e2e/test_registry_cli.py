"""``distrib-ft registry list|show|promote|rollback`` through the real CLI, on a registry of real artifacts.

Version 1 is the final/ of a tiny LoRA job that ``distrib-ft train --launcher local`` ran (its verdict, config.yaml
and data recorded); version 2 is the tiny model's folder (a full model); version 3 is refused. The pointer moves
only on promote / rollback, a refused version needs --force, errors are one line with exit 2, and a live lock
holder makes a promote fail with a line naming it.
"""

import json
import subprocess
import sys

from distrib_ft.registry import Registry
from tests.e2e.test_cli import assert_one_line_error, cli, write_job
from tests.jobs import ROOT, job_dict, set_in, toy_join


def _listing(reg) -> list[tuple]:
    r = cli("registry", "list", reg, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    return [(v["version"], v["round"], v["decision"], v["current"]) for v in json.loads(r.stdout)]


def test_registry_cli_on_versions_from_real_jobs(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, max_steps=2, save_steps=2)
    set_in(raw, "data.eval_files", [raw["data"]["train_files"][0]])
    job = write_job(tmp_path, raw)
    out = tmp_path / "out"
    r = cli("train", job, "--launcher", "local")
    assert r.returncode == 0, r.stderr[-3000:]
    reg_dir = tmp_path / "registry"

    r = cli("registry", "list", reg_dir, timeout=120)
    assert_one_line_error(r, str(reg_dir), "empty registry")
    assert_one_line_error(cli("registry", "list", reg_dir, "--json", timeout=120), "empty registry")

    reg = Registry(reg_dir)
    v1 = reg.add(out / "final", round="r1", data_files=raw["data"]["train_files"])
    verdict = json.loads((out / "verdict.json").read_text())
    assert v1.record["metrics"]["eval_loss"] == verdict["metrics"]["eval_loss"]
    assert v1.record["job"] == (out / "config.yaml").read_text() and v1.record["artifact"]["kind"] == "adapter"
    assert _listing(reg_dir) == [("v0001", "r1", "candidate", False)]
    r = cli("registry", "promote", reg_dir, "v1", timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("v0001 (current): round r1"), r.stderr
    other = toy_join(tmp_path / "r2.jsonl", n=8)
    reg.add(tiny_model_dir, round="r2", data_files=[other], verdict={"exit_code": 0, "decision": "accepted"})
    assert _listing(reg_dir) == [("v0001", "r1", "promoted", True), ("v0002", "r2", "candidate", False)]
    r = cli("registry", "promote", reg_dir, "2", "--note", "gate passed", timeout=120)
    assert r.returncode == 0, r.stderr
    assert _listing(reg_dir) == [("v0001", "r1", "promoted", False), ("v0002", "r2", "promoted", True)]
    assert Registry(reg_dir).add(out / "final", round="r3").parent == "v0002"
    Registry(reg_dir).refuse("v3", reason="suite r1 +30% > budget 10%")

    r = cli("registry", "promote", reg_dir, "v3", timeout=120)
    assert_one_line_error(r, str(reg_dir), "v0003 was refused (suite r1 +30% > budget 10%)", "--force")
    r = cli("registry", "show", reg_dir, "v9", timeout=120)
    assert_one_line_error(r, "no version v0009 (versions: v0001, v0002, v0003)")
    r = cli("registry", "show", reg_dir, timeout=120)  # the current one
    assert r.returncode == 0 and r.stdout.startswith("v0002 (current): round r2, parent v0001, promoted"), r.stdout
    r = cli("registry", "show", reg_dir, "v3", "--json", timeout=120)
    shown = json.loads(r.stdout)
    assert shown["decision"] == "refused" and shown["parent"] == "v0002" and not shown["current"]

    r = cli("registry", "rollback", reg_dir, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("v0001 (current)"), r.stderr
    r = cli("registry", "rollback", reg_dir, timeout=120)
    assert_one_line_error(r, "v0001 has no earlier current version")
    r = cli("registry", "rollback", reg_dir, "--to", "v2", timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("v0002 (current)"), r.stderr
    r = cli("registry", "list", reg_dir, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[2].startswith("* v0002") and "refused" in lines[3], r.stdout

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom distrib_ft.registry import Registry\n"
                               "with Registry(sys.argv[1]).lock('round r4'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)\n", str(reg_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("registry", "promote", reg_dir, "v1", "--wait", "0.5", timeout=120)
        assert_one_line_error(r, f"held by pid {holder.pid}", "(round r4")
    finally:
        holder.kill()
        holder.wait(30)
    r = cli("registry", "promote", reg_dir, "v3", "--force", timeout=120)  # the killed holder's lock: taken over
    assert r.returncode == 0 and r.stdout.startswith("v0003 (current)"), r.stderr
    assert _listing(reg_dir)[-1] == ("v0003", "r3", "promoted", True)
