"""Job config: strict validation naming the dotted key and the file, and command-line overrides."""

import pytest
import yaml

from distrib_ft.config import ConfigError, load_config, parse_overrides

BASE = {
    "model": {"name_or_path": "some/model"},
    "data": {"train_files": ["train.jsonl"]},
    "training": {"output_dir": "out"},
}


def write(tmp_path, raw, name="job.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def test_defaults_and_portable_key_names(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.method.type == "lora" and cfg.method.lora_alpha == 32
    assert cfg.training.lr_scheduler_type == "cosine" and cfg.training.bf16 is True
    assert cfg.distributed.deepspeed.endswith("ds_configs/zero2.json")
    assert cfg.data.format == "alpaca"


def test_unknown_key_names_dotted_key_and_file(tmp_path):
    raw = {**BASE, "training": {"output_dir": "out", "learning_rat": 1e-4}}
    p = write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "training.learning_rat" in msg and str(p) in msg and "unknown key" in msg
    assert "\n" not in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"job.yaml: trainig: unknown key"):
        load_config(write(tmp_path, {**BASE, "trainig": {}}))


def test_wrong_type_and_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"training.max_steps"):
        load_config(write(tmp_path, BASE), ["training.max_steps=lots"])
    with pytest.raises(ConfigError, match=r"training.lr_scheduler_type"):
        load_config(write(tmp_path, BASE), ["training.lr_scheduler_type=polynomial"])
    with pytest.raises(ConfigError, match=r"method.type"):
        load_config(write(tmp_path, BASE), ["method.type=prefix"])


def test_missing_required(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name_or_path: required key is missing"):
        load_config(write(tmp_path, {**BASE, "model": {}}))


def test_overrides_are_yaml_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), [
        "training.bf16=false", "training.learning_rate=3e-5", "method.target_modules=[q_proj,v_proj]",
        "distributed.num_workers=4", "method.type=full"])
    assert cfg.training.bf16 is False and cfg.training.learning_rate == 3e-5
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.distributed.num_workers == 4 and cfg.method.type == "full"


def test_override_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"training.nope: unknown key"):
        load_config(write(tmp_path, BASE), ["training.nope=1"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["training.max_steps"])


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("model:\n  name_or_path: x\ntraining: [unclosed\n")
    with pytest.raises(ConfigError, match=r"job.yaml: line \d+ is not valid YAML"):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_config(tmp_path / "nope.yaml")


def test_streaming_needs_max_steps(tmp_path):
    with pytest.raises(ConfigError, match="training.max_steps"):
        load_config(write(tmp_path, BASE), ["data.streaming=true"])
