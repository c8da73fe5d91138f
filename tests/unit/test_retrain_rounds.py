"""distrib_ft/retrain/rounds.py and the pipeline's records: a round's job from the template and the real registry.

No training: the registry's versions are real folders added with Registry.add (a LoRA adapter's files, the tiny
model for full fine-tuning), the replay buffer a real one (distrib_ft/data/replay_buffer.py). Checked: the start
model per method (base, the current model folder, the base with the lineage's adapters merged), EWC's Fisher and
replay's pinned version carried forward, one retention suite per earlier round, the overrides last, byte-identical
jobs for the same registry state, and the records: a re-run of a finished round trains nothing, a changed data file
is an input error, a refused round exits 3 again.
"""

import json
import shutil

import pytest
import yaml

from distrib_ft.data import replay_buffer as rb
from distrib_ft.registry import Registry
from distrib_ft.retrain.config import load_pipeline
from distrib_ft.retrain.pipeline import Pipeline, data_hashes, write_record
from distrib_ft.retrain.rounds import build_round, job_text
from distrib_ft.schema import ConfigError
from tests.jobs import ROOT, toy_alpaca, toy_join


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTRIB_FT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def setup(tmp_path, method=None, ewc=None, replay=None, suites=None, rounds=3) -> str:
    """A template job and a pipeline of ``rounds`` rounds; returns the pipeline file."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    job = {"model": {"name_or_path": "set-by-the-pipeline"},
           "method": method or {"type": "lora", "r": 4, "lora_alpha": 8},
           "data": {"train_files": ["placeholder.jsonl"], "max_seq_length": 64},
           "training": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "learning_rate": 1e-3},
           "distributed": {"num_workers": 2, "deepspeed": str(ROOT / "ds_configs" / "zero2.json")}}
    if suites:
        job["monitor"] = {"suites": suites}
    if ewc:
        job["ewc"] = ewc
    if replay:
        job["replay"] = replay
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    rs = []
    for i in range(rounds):
        make = toy_alpaca if i % 2 == 0 else toy_join
        train, held = make(data / f"t{i}.jsonl", n=16, seed=i), make(data / f"e{i}.jsonl", n=4, seed=100 + i)
        rs.append({"name": f"r{i + 1}", "train_files": [f"data/{train.name}"], "eval_files": [f"data/{held.name}"]})
    rs[-1]["overrides"] = {"training.learning_rate": 0.5, "monitor.policy": "rollback"}
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump({"registry": str(tmp_path / "registry"), "base_model": str(tmp_path / "base"),
                                 "job": "job.yaml", "retention_budget": 0.1, "rounds": rs}))
    (tmp_path / "base").mkdir(exist_ok=True)
    return str(p)


def adapter(folder, fisher=True):
    """A job's final/ of a LoRA run: the adapter's files (and final/fisher.safetensors of ewc.update_after)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if fisher:
        (folder / "fisher.safetensors").write_bytes(b"fisher")
    return folder


def promote(reg, final, name):
    v = reg.add(final, round=name, job_config={"round": name})
    return reg.promote(v.version)


def test_lora_ewc_replay_lineage(tmp_path, cache):
    buffer = tmp_path / "buffer"
    path = setup(tmp_path, ewc={"lambda": 100.0, "target": "lora_merged", "gamma": 0.9},
                 replay={"buffer": str(buffer), "ratio": 0.25, "update_after": True, "update_budget": 3},
                 suites=[{"name": "general", "files": ["data/e0.jsonl"], "metric": "nll"}])
    cfg = load_pipeline(path)
    reg = Registry(cfg.registry)

    first = build_round(cfg, 0, reg)
    j = first.job
    assert first.kind == "adapter" and first.parent is None and first.lineage == []
    assert j["model"]["name_or_path"] == str(tmp_path / "base") and "merge_adapters" not in j["method"]
    assert j["data"]["train_files"] == cfg.rounds[0].train_files and j["data"]["eval_files"] == cfg.rounds[0].eval_files
    assert j["training"]["output_dir"] == str(tmp_path / "out" / "r1")
    assert [s["name"] for s in j["monitor"]["suites"]] == ["general"]  # the template's, resolved
    assert j["monitor"]["suites"][0]["files"] == [str(tmp_path / "data" / "e0.jsonl")]
    assert j["ewc"]["lambda"] == 0.0 and j["ewc"]["update_after"] is True  # nothing to protect yet
    assert "replay" not in j and first.replay_buffer == str(buffer) and first.replay_budget == 3  # no version yet
    assert any("nothing to protect yet" in n for n in first.notes) and any("no version yet" in n for n in first.notes)
    assert first.path.read_text() == job_text(j) and first.path.parent.parent.parent == cache / "retrain"

    v1 = promote(reg, adapter(tmp_path / "run1" / "final"), "r1")
    rb.build(str(buffer), cfg.rounds[0].train_files, budget=4)
    second = build_round(cfg, 1, reg).job
    assert second["model"]["name_or_path"] == str(tmp_path / "base")
    assert second["method"]["merge_adapters"] == [v1.model]
    assert second["ewc"] == {"lambda": 100.0, "target": "lora_merged", "gamma": 0.9, "update_after": True,
                             "fisher_path": f"{v1.model}/fisher.safetensors"}
    assert second["replay"] == {"buffer": str(buffer), "ratio": 0.25, "update_after": False, "version": 1}
    assert second["monitor"]["suites"][1] == {"name": "r1", "files": cfg.rounds[0].eval_files, "format": "alpaca",
                                              "metric": "nll", "max_relative_increase": 0.1}

    v2 = promote(reg, adapter(tmp_path / "run2" / "final"), "r2")
    rb.update(str(buffer), cfg.rounds[1].train_files, budget=6)
    third = build_round(cfg, 2, reg)
    assert third.lineage == ["v0001", "v0002"] and third.parent == "v0002"
    assert third.job["method"]["merge_adapters"] == [v1.model, v2.model]  # oldest first
    assert third.job["ewc"]["fisher_path"] == f"{v2.model}/fisher.safetensors"
    assert third.job["replay"]["version"] == 2
    assert [s["name"] for s in third.job["monitor"]["suites"]] == ["general", "r1", "r2"]
    assert third.job["training"]["learning_rate"] == 0.5 and third.job["monitor"]["policy"] == "rollback"

    # the same registry state: the same bytes (a killed round resumes); the file is not rewritten
    mtime = third.path.stat().st_mtime_ns
    again = build_round(cfg, 2, reg)
    assert again.path == third.path and again.path.read_text() == third.path.read_text()
    assert again.path.stat().st_mtime_ns == mtime
    # it is a valid job file (the pipeline runs exactly this through distrib-ft train)
    from distrib_ft.config import load_config

    assert load_config(third.path).method.merge_adapters == [v1.model, v2.model]
    # a rollback changes the start: the round is built from v0001 again
    reg.rollback()
    assert build_round(cfg, 2, reg, write=False).job["method"]["merge_adapters"] == [v1.model]


def test_ewc_with_fisher_data_keeps_round_one_protected(tmp_path, cache):
    path = setup(tmp_path, ewc={"lambda": 10.0, "target": "lora_merged", "fisher_data_files": ["data/e0.jsonl"]})
    cfg = load_pipeline(path)
    reg = Registry(cfg.registry)
    first = build_round(cfg, 0, reg).job["ewc"]
    assert first == {"lambda": 10.0, "target": "lora_merged", "update_after": True,
                     "fisher_data_files": [str(tmp_path / "data" / "e0.jsonl")]}
    v1 = promote(reg, adapter(tmp_path / "run1" / "final", fisher=False), "r1")
    notes = build_round(cfg, 1, reg).notes  # v0001 has no Fisher: the template's source is kept, and said
    assert any("v0001 has no fisher.safetensors" in n for n in notes)
    assert v1.version == "v0001"


def test_full_starts_from_the_current_model(tmp_path, cache, tiny_model_dir):
    path = setup(tmp_path, method={"type": "full"}, ewc={"lambda": 5.0, "fisher_data_files": ["data/e0.jsonl"]})
    cfg = load_pipeline(path)
    reg = Registry(cfg.registry)
    assert build_round(cfg, 0, reg).kind == "full"
    final = tmp_path / "run1" / "final"
    shutil.copytree(tiny_model_dir, final)
    (final / "fisher.safetensors").write_bytes(b"fisher")
    v1 = promote(reg, final, "r1")
    job = build_round(cfg, 1, reg).job
    assert job["model"]["name_or_path"] == v1.model and "merge_adapters" not in job["method"]
    assert job["ewc"]["fisher_path"] == f"{v1.model}/fisher.safetensors" and "fisher_data_files" not in job["ewc"]
    from distrib_ft.config import load_config

    load_config(build_round(cfg, 1, reg).path)  # valid
    # the template switched to LoRA while the current version is a whole model: one line
    tmpl = yaml.safe_load(open(cfg.job))
    tmpl["method"] = {"type": "lora"}
    open(cfg.job, "w").write(yaml.safe_dump(tmpl))
    with pytest.raises(ConfigError, match="leaves an adapter, but the current version v0001 .* is a whole model"):
        build_round(cfg, 1, reg)


@pytest.mark.parametrize("method, says", [
    ({"type": "prompt_tuning"}, "method.type: prompt_tuning cannot be retrained in rounds"),
    ({"type": "adapter"}, "method.type: adapter cannot be retrained in rounds"),
    ({"type": "bitfit", "add_bias": True}, "method.add_bias: bitfit with added biases"),
])
def test_methods_that_cannot_chain_are_refused(tmp_path, cache, method, says):
    cfg = load_pipeline(setup(tmp_path, method=method))
    with pytest.raises(ConfigError, match=says):
        build_round(cfg, 0, Registry(cfg.registry))


def test_ewc_on_the_adapter_itself_cannot_carry_forward(tmp_path, cache):
    cfg = load_pipeline(setup(tmp_path, ewc={"lambda": 1.0, "fisher_data_files": ["data/e0.jsonl"]}))
    with pytest.raises(ConfigError, match="ewc.target: trainable cannot be carried across rounds .* lora_merged"):
        build_round(cfg, 0, Registry(cfg.registry))


def test_a_template_suite_named_like_a_round(tmp_path, cache):
    cfg = load_pipeline(setup(tmp_path, suites=[{"name": "r1", "files": ["data/e0.jsonl"]}]))
    build_round(cfg, 0, Registry(cfg.registry))  # no earlier round yet
    with pytest.raises(ConfigError, match="monitor.suites: a suite is named 'r1', like a round"):
        build_round(cfg, 1, Registry(cfg.registry))


def test_records_make_a_rerun_train_nothing(tmp_path, cache, capsys):
    cfg = load_pipeline(setup(tmp_path, rounds=2))
    reg = Registry(cfg.registry)
    v1 = promote(reg, adapter(tmp_path / "run1" / "final"), "r1")
    v2 = reg.add(adapter(tmp_path / "run2" / "final"), round="r2", job_config={})
    reg.refuse(v2.version, reason="r1 over budget")
    for i, (v, decision) in enumerate([(v1, "promoted"), (v2, "refused")]):
        write_record(reg, {"name": cfg.rounds[i].name, "data": data_hashes(cfg.rounds[i]), "version": v.version,
                           "decision": decision, "verdict": "exit 0 (accepted at step 4)",
                           "reason": "r1 over budget" if decision == "refused" else None})
    from distrib_ft.registry import file_sha256

    stamp = {r.name: [file_sha256(f) for f in r.eval_files] for r in cfg.rounds}
    (tmp_path / "registry" / "rounds" / "r1.eval.json").write_text(json.dumps(  # r1's row of R, evaluated before
        {"version": "v0001", "base_model": cfg.base_model, "files": stamp, "base": {"r1": 2.0, "r2": 3.0},
         "scores": {"r1": 1.5, "r2": 3.1}}))
    # --round r1: the rounds up to r1 only
    assert Pipeline(cfg).run(only_round="r1") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "round r1: promoted v0001 (exit 0 (accepted at step 4))" and len(out) == 2
    assert out[1].startswith("Pipeline: 1 promoted, none refused; current v0001")
    # another pipeline on the registry: this one waits for the lock, then says who holds it (exit 2 in the CLI)
    from distrib_ft.registry import LockTimeout

    with Registry(cfg.registry).lock("retrain another.yaml"):
        with pytest.raises(LockTimeout, match=r"held by pid \d+ .*\(retrain another.yaml"):
            Pipeline(cfg, wait=0.3).run()
    # the re-run prints each round's outcome and exits 3 again without a job (a job would fail: no base model)
    assert Pipeline(cfg).run() == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "round r1: promoted v0001 (exit 0 (accepted at step 4))"
    assert out[1] == "round r2: refused v0002: r1 over budget"
    assert out[2].startswith("Pipeline: 1 promoted, r2 refused; current v0001; report ")
    report = json.loads((tmp_path / "registry" / "pipeline_report.json").read_text())
    assert report["exit_code"] == 3 and report["current"] == "v0001"
    assert [r["decision"] for r in report["rounds"]] == ["promoted", "refused"]
    assert report["R"] == [[1.5, 3.1]] and report["base"] == {"r1": 2.0, "r2": 3.0}
    # a changed data file under a round that ran: an input error naming the round and the file
    with open(cfg.rounds[1].train_files[0], "a") as f:
        f.write('{"instruction": "join a and b", "input": "", "output": "a-b"}\n')
    with pytest.raises(ConfigError, match=r"rounds\[1\] \(r2\): data file .*t1.jsonl changed since the round ran "
                                          r"\(sha256 \w{12} then, \w{12} now\); give the round a new name"):
        Pipeline(cfg).run()


def test_a_round_killed_after_its_version_was_added_is_finished_without_training(tmp_path, cache, capsys):
    """The version (a candidate: killed before the gate's decision) is found by round and source, then decided."""
    from distrib_ft.runtime import verdict as vd

    cfg = load_pipeline(setup(tmp_path, rounds=1))
    reg = Registry(cfg.registry)
    built = build_round(cfg, 0, reg, write=False)
    out = tmp_path / "out" / "r1"
    adapter(out / "final")
    report = {"decision": "accepted", "exit_code": 0, "chosen_step": 4, "policy": "report", "suites": {},
              "new_task": {"metric": "nll", "kind": "loss", "baseline": 3.0, "gain": 0.5,
                           "evaluations": [{"step": 0, "value": 3.0}, {"step": 4, "value": 2.5}]}}
    (out / "report.json").write_text(json.dumps(report))
    from distrib_ft.config import config_from_dict

    job_cfg = config_from_dict({**built.job, "model": {"name_or_path": "x"}}, "job.yaml")
    vd.write(out, vd.build(command="train", config=job_cfg, output_dir=out, exit_code=0, started=vd.now(),
                           began=0.0, summary={"final": str(out / "final"), "decision": "accepted", "chosen_step": 4}))
    v = reg.add(out / "final", round="r1", job_config={})  # the killed run got this far
    from distrib_ft.registry import file_sha256

    stamp = {"r1": [file_sha256(f) for f in cfg.rounds[0].eval_files]}
    (tmp_path / "registry" / "rounds").mkdir()
    (tmp_path / "registry" / "rounds" / "r1.eval.json").write_text(json.dumps(
        {"version": v.version, "base_model": cfg.base_model, "files": stamp, "base": {"r1": 3.0},
         "scores": {"r1": 2.5}}))
    assert Pipeline(cfg).run() == 0  # no job: the base model is an empty folder, a train would fail
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("round r1: promoted v0001 (exit 0 (accepted at step 4)")
    assert [x.version for x in reg.list()] == ["v0001"] and reg.current().version == "v0001"
    rec = json.loads((tmp_path / "registry" / "rounds" / "r1.json").read_text())
    assert rec["decision"] == "promoted" and rec["gate"]["passed"] is True


def test_a_registry_on_s3_is_copied_once_to_the_cache(tmp_path, cache, s3_endpoint, monkeypatch):
    """A URL registry (moto's real S3 API): the lineage's adapters are downloaded once into the project cache."""
    from tests.s3 import make_bucket, s3_env

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    make_bucket(s3_endpoint, "retrain-unit")
    path = setup(tmp_path, ewc={"lambda": 1.0, "target": "lora_merged"}, rounds=2)
    raw = yaml.safe_load(open(path))
    raw["registry"] = "s3://retrain-unit/reg"
    open(path, "w").write(yaml.safe_dump(raw))
    cfg = load_pipeline(path)
    reg = Registry(cfg.registry, settle=0.2)
    promote(reg, adapter(tmp_path / "run1" / "final"), "r1")
    built = build_round(cfg, 1, reg)
    local = cache / "retrain" / built.path.parent.parent.name / "v0001" / "model"
    assert built.job["method"]["merge_adapters"] == [str(local)]
    assert built.job["ewc"]["fisher_path"] == str(local / "fisher.safetensors")
    assert sorted(p.name for p in local.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "fisher.safetensors"]
    (local / "adapter_model.safetensors").write_bytes(b"local")  # downloaded once: a second build reads the copy
    build_round(cfg, 1, reg)
    assert (local / "adapter_model.safetensors").read_bytes() == b"local"
