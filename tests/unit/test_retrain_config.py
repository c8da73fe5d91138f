"""distrib_ft/retrain/config.py: the pipeline file of ``distrib-ft retrain``; bad input is one line naming the key."""

import pytest
import yaml

from distrib_ft.retrain.config import PipelineConfig, RoundConfig, load_pipeline
from distrib_ft.schema import ConfigError
from launcher.cli import main


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.train.jsonl", "a.eval.jsonl", "b.train.jsonl", "b.eval.jsonl"):
        (data / name).write_text('{"instruction": "x", "input": "", "output": "y"}\n')
    (tmp_path / "job.yaml").write_text("model: {name_or_path: x}\n")
    return tmp_path


def pipeline(tmp_path, **changes) -> dict:
    raw = {"registry": "reg", "base_model": "offline:SmolLM2-135M-Instruct", "job": "job.yaml",
           "retention_budget": 0.1,
           "rounds": [{"name": "r1", "train_files": ["data/a.train.jsonl"], "eval_files": ["data/a.eval.jsonl"]},
                      {"name": "r2", "train_files": ["data/b.train.jsonl"], "eval_files": ["data/b.eval.jsonl"],
                       "overrides": {"training.learning_rate": 1.0e-4}}]}
    raw.update(changes)
    return raw


def write(tmp_path, raw) -> str:
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def test_every_field_is_documented():
    for cls in (PipelineConfig, RoundConfig):
        assert all(f.description for f in cls.model_fields.values()), cls


def test_paths_resolve_like_a_job_file(files, tmp_path, monkeypatch):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load_pipeline(write(files, pipeline(files, merge_back_alphas=[0.25, 0.75, 0.5])))
    assert cfg.job == str(files / "job.yaml")  # inputs: against the pipeline file's folder
    assert cfg.rounds[0].train_files == [str(files / "data" / "a.train.jsonl")]
    assert cfg.rounds[1].eval_files == [str(files / "data" / "b.eval.jsonl")]
    assert cfg.registry == str(cwd / "reg")  # an output: against the working directory, as training.output_dir
    assert cfg.base_model == "offline:SmolLM2-135M-Instruct"
    assert cfg.merge_back_alphas == [0.75, 0.5, 0.25]  # tried largest first
    assert cfg.rounds[1].overrides == {"training.learning_rate": 1.0e-4}
    assert cfg.round_index("r2") == 1
    url = load_pipeline(write(files, pipeline(files, registry="s3://bucket/reg")))
    assert url.registry == "s3://bucket/reg"


@pytest.mark.parametrize("change, parts", [
    (lambda r: r["rounds"][1].pop("train_files"), ["rounds[1].train_files: required key is missing"]),
    (lambda r: r["rounds"][0].update(eval_files=[]), ["rounds[0].eval_files", "at least 1"]),
    (lambda r: r["rounds"][1].update(name="r1"), ["rounds[1].name", "rounds[0]", "unique"]),
    (lambda r: r["rounds"][0].update(name="r 1"), ["rounds[0].name", "not a round name"]),
    (lambda r: r.update(retention_budgt=0.1), ["retention_budgt: unknown key; did you mean 'retention_budget'?"]),
    (lambda r: r.update(retention_budget=0), ["retention_budget", "greater than 0"]),
    (lambda r: r.update(merge_back_alphas=[0.5, 1.0]), ["merge_back_alphas", "(0, 1)"]),
    (lambda r: r["rounds"][1].update(overrides={"learning_rate": 1}), ["rounds[1].overrides", "section.key"]),
    (lambda r: r["rounds"][0].update(train_files=["data/missing.jsonl"]),
     ["rounds[0].train_files[0]: data/missing.jsonl not found"]),
    (lambda r: r.update(job="nojob.yaml"), ["job: nojob.yaml not found"]),
    (lambda r: r.update(registry="s3:/bucket/reg"), ["registry", "one slash"]),
    (lambda r: r.pop("base_model"), ["base_model: required key is missing"]),
])
def test_bad_input_is_one_line_naming_the_key(files, change, parts):
    raw = pipeline(files)
    change(raw)
    path = write(files, raw)
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_unknown_round_and_bad_yaml(files):
    cfg = load_pipeline(write(files, pipeline(files)))
    with pytest.raises(ConfigError, match=r"--round r9: no such round \(rounds: r1, r2\)"):
        cfg.round_index("r9")
    bad = files / "bad.yaml"
    bad.write_text("registry: a\nregistry: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'registry'"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_pipeline(files / "none.yaml")


def test_cli_exits_2_with_one_line(files, capsys):
    raw = pipeline(files)
    raw["rounds"][1].pop("eval_files")
    path = write(files, raw)
    assert main(["retrain", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"distrib-ft: error: {path}: rounds[1].eval_files: required key is missing"]
    assert main(["retrain", write(files, pipeline(files)), "--round", "r7"]) == 2
    assert "--round r7: no such round" in capsys.readouterr().err
