"""The real CLI: `distrib-ft export`, `distrib-ft merge` and `distrib-ft eval` with several --model, as subprocesses.

One short training run (--launcher local) gives a real run folder to export; the other adapters are made with
peft directly (random non-zero updates), as in tests/unit/test_export.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.test_cli import assert_one_line_error, clean_env, write_job
from tests.jobs import ROOT, job_dict, set_in, toy_alpaca, toy_join
from tests.unit.test_export import TOL, _base, _logits, _peft, make_lora, make_prompt_tuning

DISTRIB_FT = Path(sys.executable).parent / "distrib-ft"  # the installed console script


def cli(*args, timeout=600):
    env = clean_env(OMP_NUM_THREADS="1")
    return subprocess.run([str(DISTRIB_FT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A finished tiny LoRA run (2 steps through `distrib-ft train --launcher local`): its output_dir."""
    tmp = tmp_path_factory.mktemp("run")
    raw = job_dict(tmp, tiny_model_dir, max_steps=2, learning_rate=5e-2)
    r = cli("train", write_job(tmp, raw), "--launcher", "local")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out"


def test_export_a_run_folder_merged(tmp_path, tiny_model_dir, run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    r = cli("export", run_dir, "--out", out, "--merge")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == (f"Exported the merged model to {out} (float32): {tiny_model_dir} + "
                                                 f"the LORA adapter {run_dir / 'final'}")
    expected = _logits(_peft(tiny_model_dir, run_dir / "final"))
    assert (expected - _logits(_base(tiny_model_dir))).abs().max() > 1e-3  # the run trained something
    assert (_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)) - expected).abs().max() <= TOL
    assert AutoTokenizer.from_pretrained(out).pad_token == AutoTokenizer.from_pretrained(run_dir / "final").pad_token

    r = cli("export", run_dir, "--out", tmp_path / "bf16", "--merge", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    r = cli("export", run_dir, "--out", tmp_path / "adapter")  # without --merge: the adapter as it is
    assert r.returncode == 0, r.stderr[-3000:]
    for f in (run_dir / "final").iterdir():
        assert (tmp_path / "adapter" / f.name).read_bytes() == f.read_bytes()


def test_export_of_an_adapter_that_cannot_merge_exits_0(tmp_path, tiny_model_dir):
    adapter = make_prompt_tuning(tiny_model_dir, tmp_path / "pt")
    r = cli("export", adapter, "--out", tmp_path / "out", "--merge")
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("Not merged: prompt_tuning prepends virtual tokens to the input"), line
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() and (tmp_path / "out" / "README.txt").exists()


def test_export_bad_inputs_exit_2_with_one_line(tmp_path, tiny_model_dir):
    r = cli("export", tmp_path / "nope", "--out", tmp_path / "out", timeout=120)
    assert_one_line_error(r, f"{tmp_path / 'nope'}: no such folder")
    (tmp_path / "empty").mkdir()
    r = cli("export", tmp_path / "empty", "--out", tmp_path / "out", timeout=120)
    assert_one_line_error(r, "holds neither a peft adapter (adapter_config.json)")
    adapter = make_lora(tiny_model_dir, tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/gone/model"}))
    r = cli("export", adapter, "--out", tmp_path / "out", "--merge", timeout=120)
    assert_one_line_error(r, "base model /gone/model not found", "pass --base MODEL_FOLDER")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    r = cli("export", adapter, "--out", tmp_path / "taken", timeout=120)
    assert_one_line_error(r, f"--out: {tmp_path / 'taken'} exists and is not empty; use --overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty", "taken"]  # nothing half-written


def test_merge_then_eval_and_eval_of_two_adapters_equals_their_cat_merge(tmp_path, tiny_model_dir):
    a = make_lora(tiny_model_dir, tmp_path / "a", r=4, seed=1, targets=("q_proj", "v_proj"))
    b = make_lora(tiny_model_dir, tmp_path / "b", r=2, seed=2, targets=("q_proj", "o_proj", "down_proj"))
    r = cli("merge", "--adapters", a, b, "--method", "linear", "--out", tmp_path / "linear", timeout=120)
    assert_one_line_error(r, "--method linear: the adapters have different ranks (4, 2); use --method cat")
    r = cli("merge", "--adapters", a, b, "--method", "cat", "--out", tmp_path / "cat")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "into one adapter of rank 6" in r.stdout
    summed = _logits(_peft(tiny_model_dir, tmp_path / "cat"))
    from distrib_ft.export import load_merged

    assert (summed - _logits(load_merged(_base(tiny_model_dir), [a, b]))).abs().max() <= TOL
    c = make_lora(tiny_model_dir, tmp_path / "c", r=4, seed=3, targets=("q_proj", "k_proj"))
    r = cli("merge", "--adapters", a, c, "--method", "linear", "--weights", "0.5", "0.5", "--out", tmp_path / "lin")
    assert r.returncode == 0, r.stderr[-3000:]
    _peft(tiny_model_dir, tmp_path / "lin")  # a normal peft adapter
    assert json.loads((tmp_path / "lin" / "merge.json").read_text())["weights"] == [0.5, 0.5]

    raw = job_dict(tmp_path, tiny_model_dir)
    set_in(raw, "data.eval_files", [str(toy_alpaca(tmp_path / "new_eval.jsonl", n=6, seed=1))])
    set_in(raw, "monitor.suites", [{"name": "old", "files": [str(toy_join(tmp_path / "old.jsonl", n=6))]}])
    job = write_job(tmp_path, raw)
    reports = {}
    for name, models in (("cat", [tmp_path / "cat"]), ("two", [a, b])):
        args = [x for m in models for x in ("--model", m)]
        r = cli("eval", job, *args, "--out", tmp_path / f"eval-{name}", "--launcher", "local")
        assert r.returncode in (0, 3), r.stderr[-3000:]
        reports[name] = json.loads((tmp_path / f"eval-{name}" / "report.json").read_text())
        assert r.returncode == reports[name]["exit_code"]
        assert f"Decision: {reports[name]['decision']}" in r.stdout
    assert f"step 1 = {tmp_path / 'cat'}" in reports["cat"]["notes"]
    assert f"step 1 = {a} + {b} (adapters merged into the base in this order)" in reports["two"]["notes"]
    cat, two = reports["cat"], reports["two"]
    assert [e["step"] for e in two["suites"]["old"]["evaluations"]] == [0, 1]
    assert two["suites"]["old"]["baseline"] == cat["suites"]["old"]["baseline"]  # the same base
    after = [rep["suites"]["old"]["evaluations"][-1]["value"] for rep in (cat, two)]
    assert after[0] != two["suites"]["old"]["baseline"]  # the adapters change the suite's loss
    assert after[1] == pytest.approx(after[0], rel=1e-5, abs=1e-6)
    assert two["new_task"]["gain"] == pytest.approx(cat["new_task"]["gain"], rel=1e-5, abs=1e-6)
    assert two["decision"] == cat["decision"]

    pt = make_prompt_tuning(tiny_model_dir, tmp_path / "pt")
    r = cli("eval", job, "--model", a, "--model", pt, "--launcher", "local", timeout=120)
    assert_one_line_error(r, f"--model: {pt} cannot be merged into the base weights")
