"""Job config: strict validation naming the dotted key and the file, and command-line overrides."""

import pytest
import yaml

from distrib_ft.config import ConfigError, config_from_dict, load_config, parse_overrides

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
        "distributed.num_workers=4", "method.r=4"])
    assert cfg.training.bf16 is False and cfg.training.learning_rate == 3e-5
    assert cfg.method.target_modules == ["q_proj", "v_proj"] and cfg.method.r == 4
    assert cfg.distributed.num_workers == 4 and cfg.method.type == "lora"


def test_a_key_of_another_method_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"job.yaml: method.r: not a key of method.type full \(it is one of lora, qlora's\)"):
        load_config(write(tmp_path, BASE), ["method.type=full", "method.r=4"])
    with pytest.raises(ConfigError, match=r"job.yaml: method.type: 'qlorra' is not a method; known: full, lora"):
        load_config(write(tmp_path, BASE), ["method.type=qlorra"])


@pytest.mark.parametrize("old,new", [("data.token_masking", "token_masking"), ("replay.generate", "generative_replay"),
                                     ("ewc.fisher_file", "ewc.fisher_path"),
                                     ("ewc.fisher_files", "ewc.fisher_data_files"),
                                     ("ewc.update_fisher_after", "ewc.update_after")])
def test_a_moved_key_names_its_new_place(tmp_path, old, new):
    with pytest.raises(ConfigError, match=rf"job.yaml: {old}: this key is now {new}"):
        load_config(write(tmp_path, BASE), [f"{old}=1"])


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


def test_a_repeated_key_is_an_error_naming_it_and_both_lines(tmp_path):
    """shared case yaml-duplicate-keys: pyyaml keeps the last of two keys silently."""
    job = tmp_path / "job.yaml"
    job.write_text("model: {name_or_path: m}\ndata: {train_files: [t.jsonl]}\ntraining:\n  output_dir: out\n"
                   "  learning_rate: 1.0e-5\n  bf16: false\n  learning_rate: 1.0e-1\n")
    with pytest.raises(ConfigError) as e:
        load_config(job)
    assert str(e.value) == f"{job}: line 7: duplicate key 'learning_rate' in training (first on line 5)"
    job.write_text("model: {name_or_path: m}\nmethod: {type: lora}\ndata: {train_files: [t.jsonl]}\n"
                   "training: {output_dir: out}\nmethod: {type: full}\n")
    with pytest.raises(ConfigError, match=r"job.yaml: line 5: duplicate key 'method' \(first on line 2\)$"):
        load_config(job)
    job.write_text("model: {name_or_path: m}\ndata: {train_files: [t.jsonl]}\ntraining: {output_dir: out}\n"
                   "monitor:\n  suites:\n    - {name: a, files: [x], name: b}\n")
    with pytest.raises(ConfigError, match=r"line 6: duplicate key 'name' in monitor.suites\[0\]"):
        load_config(job)


def test_a_target_module_that_matches_nothing_is_refused_before_training(tmp_path, tiny_model_dir):
    """shared case target-modules-typo: [q_proj, v_prj] trained q_proj only, exit 0."""
    from distrib_ft.job import resolve
    from tests.jobs import job_dict

    raw = job_dict(tmp_path, tiny_model_dir)
    raw["method"]["target_modules"] = ["q_proj", "v_prj"]
    with pytest.raises(ConfigError, match=r"<config>: method.target_modules: 'v_prj' matches no module of the model; "
                                          r"modules that can take an adapter are down_proj, embed_tokens, .*, v_proj$"):
        resolve(config_from_dict(raw))
    raw["method"]["target_modules"] = ["q_proj", "v_proj"]
    assert resolve(config_from_dict(raw)).config.method.target_modules == ["q_proj", "v_proj"]


def test_dora_under_zero3_is_refused_at_start_up(tmp_path, tiny_model_dir):
    """shared case dora-zero3-crash: a tensor-size error deep in peft, exit 1."""
    from distrib_ft.job import resolve
    from tests.jobs import job_dict

    raw = job_dict(tmp_path, tiny_model_dir, zero=3)
    raw["method"]["use_dora"] = True
    with pytest.raises(ConfigError, match=r"method.use_dora: DoRA is not supported under ZeRO-3; use zero2.json"):
        resolve(config_from_dict(raw))


def test_set_but_unused_defence_inputs_are_errors_and_replay_version_is_checked_by_replay(tmp_path, tiny_model_dir):
    from distrib_ft.data import replay_buffer as rb
    from distrib_ft.job import resolve
    from tests.jobs import job_dict, toy_join

    raw = job_dict(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match=r"replay.buffer: is set but replay is off \(ratio 0, update_after false\)"):
        config_from_dict({**raw, "replay": {"buffer": "buf"}})
    # replay.version is the replay defence's to check against its checkpoint state (a resume after
    # `replay update` sets replay.version to the checkpoint's version): not part of the job's identity
    rb.build(str(tmp_path / "buf"), [str(toy_join(tmp_path / "old.jsonl", n=4))])
    owners = [resolve(config_from_dict({**raw, "replay": {"buffer": str(tmp_path / "buf"), "ratio": 0.25,
                                                          **version}})).owner() for version in ({}, {"version": 1})]
    assert owners[0] == owners[1]


def test_an_unknown_key_suggests_the_close_spelling(tmp_path):
    with pytest.raises(ConfigError, match=r"training.learnig_rate: unknown key; did you mean 'learning_rate'\?$"):
        load_config(write(tmp_path, BASE), ["training.learnig_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"job.yaml: ewc.lamda: unknown key; did you mean 'lambda'\?$"):
        load_config(write(tmp_path, BASE), ["ewc.lamda=1"])


def test_kl_to_base_needs_eval_files_and_its_budget_needs_it(tmp_path):
    with pytest.raises(ConfigError, match=r"monitor.kl_to_base: needs data.eval_files"):
        load_config(write(tmp_path, BASE), ["monitor.kl_to_base=true"])
    with pytest.raises(ConfigError, match=r"monitor.max_kl_to_base: set monitor.kl_to_base: true"):
        load_config(write(tmp_path, BASE), ["monitor.max_kl_to_base=0.1"])
