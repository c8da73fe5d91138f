"""Fixes from the review of ``distrib-ft retrain`` (issue 12): each checked where it could fail, without training.

Reuses the fixtures of tests/unit/test_retrain_rounds.py (a template job, a pipeline file, adapters added to a real
registry; moto's S3 server for a registry on a URL). Checked: a second holder of the registry's lock says who holds
it on stderr while it waits; the pipeline file's errors read as one line (no "(top level): ", each folder looked in
once); a rejected run's verdict line shows its last eval_loss; a URL registry recreated at the same URL (a new v0001
of the same sizes) and a round's URL final/ written again are downloaded again, not read from the stale copy; a typo
in a round's overrides and an override of a key the pipeline sets are input errors (exit 2) when the file loads,
naming ``rounds[i].overrides``, before anything trains. The file runs in about 6 s.
"""

import pytest

from distrib_ft.registry import LockTimeout, Registry
from tests.unit.test_retrain_rounds import adapter, cache, promote, setup  # noqa: F401  (cache is a fixture)


def test_waiting_for_the_registry_lock_says_who_holds_it(tmp_path, cache, capsys):  # noqa: F811
    from distrib_ft.retrain.config import load_pipeline

    cfg = load_pipeline(setup(tmp_path, rounds=1))
    with Registry(cfg.registry).lock("retrain other.yaml"):
        capsys.readouterr()
        with pytest.raises(LockTimeout):
            with Registry(cfg.registry, wait=0.3).lock("promote v0001"):
                pass
        err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"waiting for {cfg.registry}'s lock, held by pid ")
    assert "(retrain other.yaml); up to 0.3 s" in err[0] and " since 20" in err[0]
    with Registry(cfg.registry, wait=0.3).lock("free"):  # a free lock: nothing said
        pass
    assert capsys.readouterr().err == ""


def _pipeline(tmp_path, **change):
    import yaml

    path = setup(tmp_path, rounds=2)
    raw = yaml.safe_load(open(path))
    for key, value in change.items():
        raw[key] = value(raw[key]) if callable(value) else value
    open(path, "w").write(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_pipeline_errors_read_as_one_line_without_noise(tmp_path, cache, monkeypatch):  # noqa: F811
    from distrib_ft.retrain.config import load_pipeline
    from distrib_ft.schema import ConfigError

    path = _pipeline(tmp_path, rounds=lambda rs: [rs[0], {**rs[1], "name": "r1"}])
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    assert str(e.value) == f"{path}: rounds[1].name: 'r1' is also rounds[0]'s; names are unique"
    # the pipeline's folder is the working directory: each folder is listed once
    monkeypatch.chdir(tmp_path)
    path = _pipeline(tmp_path, rounds=lambda rs: [rs[0], {**rs[1], "eval_files": ["data/nope.jsonl"]}])
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    where = str(e.value).split("(looked in ")[1].rstrip(")").split(", ")
    assert str(e.value).startswith(f"{path}: rounds[1].eval_files[0]: data/nope.jsonl not found")
    assert where[0] == str(tmp_path / "data") and len(where) == len(set(where)) == 2, where


def test_a_rejected_runs_verdict_line_shows_its_last_eval_loss(tmp_path):
    """exit 3: no chosen step, so the summary's eval_loss is null; the line shows report.json's last evaluation."""
    from distrib_ft.config import config_from_dict
    from distrib_ft.runtime import verdict as vd

    out = tmp_path / "out"
    (out / "rejected").mkdir(parents=True)
    report = {"decision": "rejected", "exit_code": 3, "chosen_step": None, "suites": {},
              "new_task": {"metric": "nll", "baseline": 6.2, "evaluations": [{"step": 0, "value": 6.2},
                                                                             {"step": 2, "value": 5.9973}]}}
    summary = {"final": str(out / "rejected"), "decision": "rejected", "chosen_step": None, "exit_code": 3,
               "eval_loss_start": 6.2, "eval_loss": None}
    job = config_from_dict({"model": {"name_or_path": "x"}, "data": {"train_files": ["a.jsonl"]},
                            "training": {"output_dir": str(out)}}, "job.yaml")
    v = vd.build(command="train", config=job, output_dir=out, exit_code=3, started=vd.now(), began=0.0,
                 summary=summary, report=report)
    assert v["metrics"]["eval_loss"] == 5.9973
    assert "eval_loss 6.2000 -> 5.9973" in vd.line(v)
    summary["eval_loss"], report["chosen_step"] = 6.0, 2  # an accepted run's own value is kept
    assert vd.build(command="train", config=job, output_dir=out, exit_code=0, started=vd.now(), began=0.0,
                    summary=summary, report=report)["metrics"]["eval_loss"] == 6.0


def _on_s3(tmp_path, s3_endpoint, monkeypatch, bucket: str) -> str:
    import yaml

    from tests.s3 import make_bucket, s3_env

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    make_bucket(s3_endpoint, bucket)
    path = setup(tmp_path, ewc={"lambda": 1.0, "target": "lora_merged"}, rounds=2)
    raw = yaml.safe_load(open(path))
    raw["registry"] = f"s3://{bucket}/reg"
    open(path, "w").write(yaml.safe_dump(raw))
    return path


def test_a_registry_recreated_at_the_same_url_is_downloaded_again(tmp_path, cache, s3_endpoint,  # noqa: F811
                                                                  monkeypatch, capsys):
    """The cached copy of v0001 is keyed on the version's identity, not its name: a new v0001 is fetched again."""
    from pathlib import Path

    from distrib_ft.retrain.config import load_pipeline
    from distrib_ft.retrain.rounds import build_round
    from distrib_ft.runtime.storage import UrlPath

    cfg = load_pipeline(_on_s3(tmp_path, s3_endpoint, monkeypatch, "retrain-review"))
    reg = Registry(cfg.registry, settle=0.2)
    promote(reg, adapter(tmp_path / "run1" / "final"), "r1")
    local = Path(build_round(cfg, 1, reg).job["method"]["merge_adapters"][0])
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights"
    assert build_round(cfg, 1, reg).job["method"]["merge_adapters"] == [str(local)]  # the same version: no notice
    assert "downloading it again" not in capsys.readouterr().err

    UrlPath(cfg.registry).rmtree()  # recreated at the same URL: another v0001, of the same sizes
    reg = Registry(cfg.registry, settle=0.2)
    other = adapter(tmp_path / "other" / "final")
    (other / "adapter_model.safetensors").write_bytes(b"WEIGHTS")
    (other / "fisher.safetensors").write_bytes(b"FISHER")
    promote(reg, other, "r1")
    job = build_round(cfg, 1, reg).job
    assert job["method"]["merge_adapters"] == [str(local)]
    assert (local / "adapter_model.safetensors").read_bytes() == b"WEIGHTS"  # not the old registry's adapter
    assert (local / "fisher.safetensors").read_bytes() == b"FISHER"
    err = capsys.readouterr().err
    assert "was made from other content (version v0001 changed since" in err and "downloading it again" in err


def test_a_rounds_url_artifact_copy_follows_its_content(tmp_path, cache, s3_endpoint, monkeypatch):  # noqa: F811
    """pipeline._local_artifact (merge_back's input): a URL final/ written again is downloaded again."""
    from pathlib import Path

    from distrib_ft.retrain.config import load_pipeline
    from distrib_ft.retrain.pipeline import Pipeline
    from distrib_ft.runtime.storage import UrlPath, upload_tree

    cfg = load_pipeline(_on_s3(tmp_path, s3_endpoint, monkeypatch, "retrain-review-out"))
    url = UrlPath("s3://retrain-review-out/out/r2/final")
    upload_tree(adapter(tmp_path / "a" / "final"), url)
    pipe = Pipeline(cfg)
    local = Path(pipe._local_artifact(str(url)))
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights"
    assert pipe._local_artifact(str(url)) == str(local)
    url.rmtree()
    new = adapter(tmp_path / "b" / "final")
    (new / "adapter_model.safetensors").write_bytes(b"weights of the re-run")
    upload_tree(new, url)
    assert pipe._local_artifact(str(url)) == str(local)
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights of the re-run"


def test_a_typo_in_a_rounds_overrides_is_an_input_error_before_anything_trains(tmp_path, cache, capsys):  # noqa: F811
    from launcher.cli import main

    path = _pipeline(tmp_path, rounds=lambda rs: [rs[0], {**rs[1], "overrides": {"training.learning_rat": 1e-4}}])
    assert main(["retrain", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{path}: rounds[1].overrides: training.learning_rat: unknown key; did you mean 'learning_rate'?" in err[0]
    assert not (tmp_path / "registry").exists() and not (tmp_path / "out").exists()  # nothing ran
    # a value of the wrong type, and an override that the template's validation would refuse (a suite's budget)
    path = _pipeline(tmp_path, rounds=lambda rs: [{**rs[0], "overrides": {"training.max_steps": "ten"}}, rs[1]])
    from distrib_ft.retrain.config import load_pipeline
    from distrib_ft.schema import ConfigError

    with pytest.raises(ConfigError, match=r"pipeline.yaml: rounds\[0\].overrides: training.max_steps: .*'ten'"):
        load_pipeline(path)
    path = _pipeline(tmp_path, rounds=lambda rs: [rs[0], {**rs[1], "overrides": {"monitor.policy": "undo"}}])
    with pytest.raises(ConfigError, match=r"rounds\[1\].overrides: monitor.policy: .*'undo'"):
        load_pipeline(path)
    # good overrides still load (a template typo: tests/unit/test_retrain_history.py, named against the template)
    cfg = load_pipeline(_pipeline(tmp_path, rounds=lambda rs: [rs[0], {**rs[1], "overrides": {
        "training.learning_rate": 1e-4, "monitor.policy": "rollback", "method.r": 8}}]))
    assert cfg.rounds[1].overrides["method.r"] == 8


@pytest.mark.parametrize("key, value, instead", [
    ("data.train_files", ["data/t0.jsonl"], "list the files in the round's train_files"),
    ("data.eval_files", ["data/e0.jsonl"], "list the files in the round's eval_files"),
    ("training.output_dir", "/elsewhere", "set training.output_dir in the template job"),
    ("model.name_or_path", "offline:tiny", "set base_model in the pipeline file"),
    ("method.merge_adapters", ["/a"], "merges the current version's adapters"),
    ("ewc.fisher_path", "/f.safetensors", "reads the current version's fisher.safetensors"),
    ("ewc.update_after", False, "the pipeline always sets it"),
    ("replay.version", 1, "pins the buffer's newest version"),
    ("replay.update_after", True, "after a promotion"),
    ("monitor.suites", [], "add the suite to the template job's monitor.suites"),
])
def test_overrides_of_keys_the_pipeline_sets_are_refused(tmp_path, cache, key, value, instead):  # noqa: F811
    from distrib_ft.retrain.config import load_pipeline
    from distrib_ft.schema import ConfigError

    path = _pipeline(tmp_path, rounds=lambda rs: [rs[0], {**rs[1], "overrides": {"training.learning_rate": 1e-4,
                                                                                 key: value}}])
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: rounds[1].overrides: {key}: set by the pipeline, not by a round's overrides; ")
    assert instead in msg and "\n" not in msg
