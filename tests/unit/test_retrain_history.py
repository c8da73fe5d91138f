"""A pipeline file against the rounds its registry has decided (issue 12's fixes after a new user's report).

No training: decided rounds are faked through the real Registry and round records (as in
tests/unit/test_retrain_rounds.py, whose fixtures this reuses). Checked, exit 2 before anything trains: a round that
has not run placed before rounds that have (a renamed or inserted round) and a promoted round removed from the file,
a decided round whose overrides changed since it ran (its record keeps them); a refused round removed from the end
still passes. These checks read the registry, so they run when the pipeline starts (Pipeline.run, under the
registry's lock), before its first round: exit 2 through the CLI, nothing trained or added. And a typo in the
template job is an input error on every load (naming the template file), pending rounds or not.
"""

import pytest
import yaml

from distrib_ft.registry import Registry
from distrib_ft.retrain.checks import check_history
from distrib_ft.retrain.config import load_pipeline
from distrib_ft.retrain.pipeline import Pipeline, data_hashes, write_record
from distrib_ft.schema import ConfigError
from tests.unit.test_retrain_rounds import adapter, cache, promote, setup  # noqa: F401  (cache is a fixture)


def _decide(tmp_path, cfg, i: int, decision: str, **extra) -> None:
    """Round ``i`` decided as a finished run leaves it: its version in the registry, then its record."""
    reg = Registry(cfg.registry)
    rnd = cfg.rounds[i]
    final = adapter(tmp_path / f"run{i}" / "final")
    if decision == "promoted":
        v = promote(reg, final, rnd.name)
    else:
        v = reg.add(final, round=rnd.name, job_config={})
        reg.refuse(v.version, reason="r1 over budget")
    write_record(reg, {"name": rnd.name, "data": data_hashes(rnd), "version": v.version, "decision": decision,
                       "verdict": "exit 0 (accepted at step 4)", **extra})


def _start(path: str) -> None:
    """The checks Pipeline.run makes first (under the registry's lock) on the file as it is now."""
    check_history(load_pipeline(path))


def _edit(path: str, change) -> None:
    raw = yaml.safe_load(open(path))
    raw["rounds"] = change(raw["rounds"])
    open(path, "w").write(yaml.safe_dump(raw, sort_keys=False))


def test_a_renamed_or_inserted_round_before_decided_rounds_is_refused_at_start(tmp_path, cache):  # noqa: F811
    path = setup(tmp_path, rounds=3)
    cfg = load_pipeline(path)
    for i in range(3):
        _decide(tmp_path, cfg, i, "promoted")
    # r1 renamed: it has not run, r2 and r3 have
    _edit(path, lambda rs: [{**rs[0], "name": "r1_v1"}, *rs[1:]])
    with pytest.raises(ConfigError) as e:
        _start(path)
    assert str(e.value).startswith(f"{path}: round r1 was promoted (v0001, ")
    assert str(e.value).endswith("but is no longer in the file; keep decided rounds in the file; only a refused "
                                 "round may be removed")
    # a new round inserted before decided ones (all decided rounds kept)
    _edit(path, lambda rs: [{**rs[0], "name": "r1"}, {**rs[1], "name": "upper_v1"}, *rs[1:]])
    with pytest.raises(ConfigError) as e:
        _start(path)
    assert str(e.value) == (f"{path}: rounds[1] (upper_v1) has not run but rounds after it (r2, r3) have; append "
                            "new rounds at the end (a decided round's name stands for what it trained)")
    from launcher.cli import main

    assert main(["retrain", path, "--launcher", "local"]) == 2  # the CLI: exit 2, nothing trained or added
    assert [v.round for v in Registry(cfg.registry).list()] == ["r1", "r2", "r3"]
    with pytest.raises(ConfigError, match=r"rounds\[1\] \(upper_v1\) has not run"):
        Pipeline(load_pipeline(path)).run()
    # the same round appended at the end passes
    _edit(path, lambda rs: [rs[0], *rs[2:], rs[1]])
    _start(path)


def test_a_refused_round_may_be_removed_from_the_end(tmp_path, cache):  # noqa: F811
    path = setup(tmp_path, rounds=3)
    cfg = load_pipeline(path)
    _decide(tmp_path, cfg, 0, "promoted")
    _decide(tmp_path, cfg, 1, "promoted")
    _decide(tmp_path, cfg, 2, "refused")
    _edit(path, lambda rs: [*rs[:2], {**rs[2], "name": "r3b"}])  # docs/scheduling.md: past a refusal
    _start(path)
    _edit(path, lambda rs: rs[:2])
    _start(path)
    _edit(path, lambda rs: rs[:1])  # but not a promoted one
    with pytest.raises(ConfigError, match="round r2 was promoted"):
        _start(path)


def test_a_decided_rounds_changed_overrides_are_an_input_error(tmp_path, cache, capsys):  # noqa: F811
    """The record keeps the round's overrides (Pipeline._finish); an edit since -> exit 2, not the old decision."""
    import json

    from distrib_ft.retrain.rounds import build_round

    path = setup(tmp_path, rounds=2)  # r2's overrides: training.learning_rate 0.5, monitor.policy rollback
    cfg = load_pipeline(path)
    reg = Registry(cfg.registry)
    _decide(tmp_path, cfg, 0, "promoted", overrides={})
    v = reg.add(adapter(tmp_path / "run1" / "final"), round="r2", job_config={})
    reg.refuse(v.version, reason="r1 over budget")
    pipe = Pipeline(cfg)
    assert pipe._finish(1, build_round(cfg, 1, reg, write=False), reg.show(v.version), data_hashes(cfg.rounds[1])) == 3
    rec = json.loads((tmp_path / "registry" / "rounds" / "r2.json").read_text())
    assert rec["overrides"] == {"training.learning_rate": 0.5, "monitor.policy": "rollback"}
    _start(path)  # unchanged: passes
    _edit(path, lambda rs: [rs[0], {**rs[1], "overrides": {"training.learning_rate": 1e-4,
                                                           "monitor.policy": "rollback"}}])
    from launcher.cli import main

    capsys.readouterr()
    assert main(["retrain", path, "--launcher", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"distrib-ft: error: {path}: rounds[1] (r2): overrides changed since the round ran "
                   "(training.learning_rate: 0.5 then, 0.0001 now); give the round a new name"], err
    ran = rec["overrides"]
    _edit(path, lambda rs: [{**rs[0], "overrides": {"training.max_steps": 2}}, {**rs[1], "overrides": ran}])
    with pytest.raises(ConfigError, match=r"rounds\[0\] \(r1\): overrides changed since the round ran "
                                          r"\(training.max_steps: unset then, 2 now\)"):
        _start(path)
    # a record written before overrides were recorded (no key): unknown, not an error
    rec.pop("overrides")
    (tmp_path / "registry" / "rounds" / "r2.json").write_text(json.dumps(rec))
    _edit(path, lambda rs: [{**rs[0], "overrides": {}}, rs[1]])
    _start(path)


def test_a_typo_in_the_template_job_is_an_input_error_on_every_load(tmp_path, cache, capsys):  # noqa: F811
    """No round has overrides: the template itself (the pipeline's keys filled) is validated, naming JOB.yaml."""
    path = setup(tmp_path, rounds=2)
    _edit(path, lambda rs: [{k: v for k, v in r.items() if k != "overrides"} for r in rs])
    job = tmp_path / "job.yaml"
    raw = yaml.safe_load(job.read_text())
    raw["training"]["learning_rat"] = raw["training"].pop("learning_rate")
    job.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    msg = str(e.value)
    assert msg.startswith(f"{job}: training.learning_rat: unknown key") and msg.endswith(" (the pipeline's job)"), msg
    assert "\n" not in msg and "jobs/" not in msg  # not a generated job in the cache
    from launcher.cli import main

    capsys.readouterr()
    assert main(["retrain", path, "--launcher", "local"]) == 2
    assert capsys.readouterr().err.strip() == f"distrib-ft: error: {msg}"
    assert not (tmp_path / "registry").exists() and not (tmp_path / "out").exists()  # nothing ran


def test_the_history_checks_read_a_registry_on_s3(tmp_path, cache, s3_endpoint, monkeypatch):  # noqa: F811
    """The records are read through pyarrow.fs from a registry on a URL (moto's S3 server)."""
    from tests.unit.test_retrain_review import _on_s3

    path = _on_s3(tmp_path, s3_endpoint, monkeypatch, "retrain-history")
    cfg = load_pipeline(path)
    reg = Registry(cfg.registry, settle=0.2)
    for i in range(2):
        v = promote(reg, adapter(tmp_path / f"run{i}" / "final"), cfg.rounds[i].name)
        write_record(reg, {"name": cfg.rounds[i].name, "data": data_hashes(cfg.rounds[i]), "version": v.version,
                           "decision": "promoted", "overrides": cfg.rounds[i].overrides})
    _start(path)
    _edit(path, lambda rs: [{**rs[0], "name": "r1_v1"}, rs[1], {**rs[0], "name": "r1"}])
    with pytest.raises(ConfigError, match=r"rounds\[0\] \(r1_v1\) has not run but rounds after it \(r2, r1\) have"):
        _start(path)
