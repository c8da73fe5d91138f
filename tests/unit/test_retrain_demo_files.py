"""The retraining demo's files (examples/retrain/, issue 12 must-have 8; docs/retrain.md): they load and build.

Both pipeline files validate, and each of their three rounds builds a job (distrib_ft/retrain/rounds.py) that the
job schema accepts, against an empty registry: the plain template has no defences, the defended one replay and
EWC; the committed data is exactly what make_data.py writes (so "regenerate with make_data.py" stays true).
"""

import importlib.util

import pytest

from distrib_ft.config import config_from_dict
from distrib_ft.registry import Registry
from distrib_ft.retrain.config import load_pipeline
from distrib_ft.retrain.rounds import build_round
from tests.jobs import ROOT

DEMO = ROOT / "examples" / "retrain"


@pytest.mark.parametrize("name,defended", [("pipeline_plain.yaml", False), ("pipeline.yaml", True)])
def test_demo_pipelines_build_valid_round_jobs(tmp_path, name, defended):
    cfg = load_pipeline(DEMO / name)
    assert [r.name for r in cfg.rounds] == ["r1_length_mass", "r2_volume_time", "r3_spell"]
    registry = Registry(tmp_path / "registry")
    for i, rnd in enumerate(cfg.rounds):
        built = build_round(cfg, i, registry, write=False)
        job = config_from_dict(built.job)
        assert [str(f) for f in job.data.train_files] == rnd.train_files
        assert [s.name for s in job.monitor.suites] == [r.name for r in cfg.rounds[:i]]
        if defended:  # an empty registry: nothing to protect yet (lambda 0), the Fisher written for the next round
            assert built.job["ewc"]["update_after"] and built.job["ewc"]["lambda"] == 0.0
            assert built.job["ewc"]["gamma"] == 0.9 and built.replay_buffer is not None
        else:
            assert "replay" not in built.job and "ewc" not in built.job and built.replay_buffer is None


def test_demo_data_is_what_make_data_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_data", DEMO / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    committed = sorted(p.name for p in (DEMO / "data").glob("*.jsonl"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.jsonl")) and len(committed) == 6
    for name in committed:
        assert (tmp_path / name).read_bytes() == (DEMO / "data" / name).read_bytes(), name
    train = {line for line in (DEMO / "data" / "spell_train.jsonl").read_text().splitlines()}
    held_out = {line for line in (DEMO / "data" / "spell_eval.jsonl").read_text().splitlines()}
    assert len(train) == 64 and len(held_out) == 16 and not train & held_out
