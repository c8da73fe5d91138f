"""Load-time checks of a pipeline's rounds: each round's ``overrides`` before anything trains (issue 12).

Called by :func:`distrib_ft.retrain.config.load_pipeline`, so that a typo in round 3's overrides is an input error
(exit 2) naming the pipeline file and the round, not an error against a generated job in the cache once rounds 1
and 2 have trained:

- keys the pipeline sets itself (the round's data, its output folder, its start model, the carried-forward EWC and
  replay keys, the retention suites) are refused, naming where to put the value instead;
- every round's job is validated as a job file (distrib_ft/config.py's pydantic models, as ``distrib-ft train``
  validates it): the template with the keys the pipeline owns filled (the round's data files, ``base_model``, the
  retention suites of the earlier rounds), then the round's overrides. An error that only the overrides bring is
  reported as ``PIPELINE.yaml: rounds[1].overrides: training.learning_rat: unknown key; ...``. The template itself
  (with the owned keys filled) is validated on every load, whether or not a round has overrides or is pending, and
  its errors name the template file: ``JOB.yaml: training.learning_rat: unknown key ... (the pipeline's job)``.

And, when the pipeline starts (:func:`check_history`, called by Pipeline.run under the registry's lock, since it
reads the registry), the file against the rounds the registry's records say were decided: a round that has not run
placed before rounds that have (a renamed or inserted round), a promoted round no longer in the file, or a decided
round whose ``overrides`` differ from those its record holds (the record keeps them), is exit 2.
"""

from __future__ import annotations

import copy

from distrib_ft.schema import ConfigError

# key -> where its value comes from instead (the pipeline sets these when it builds a round: rounds.py)
OWNED = {
    "model.name_or_path": "set base_model in the pipeline file (round 1 starts there; a later round starts from the "
                          "registry's current version)",
    "data.train_files": "list the files in the round's train_files",
    "data.eval_files": "list the files in the round's eval_files",
    "training.output_dir": "set training.output_dir in the template job (each round writes to <output_dir>/<round "
                           "name>)",
    "method.merge_adapters": "the pipeline merges the current version's adapters (its lineage) into base_model; "
                             "start a new registry to start elsewhere",
    "ewc.fisher_path": "a later round reads the current version's fisher.safetensors; for round 1 set ewc.fisher_path "
                       "or ewc.fisher_data_files in the template job",
    "ewc.update_after": "the pipeline always sets it (the next round reads final/fisher.safetensors)",
    "replay.version": "the pipeline pins the buffer's newest version when the round starts",
    "replay.update_after": "the pipeline adds a sample of the round's data after a promotion (replay.update_budget "
                           "sets its size)",
    "monitor.suites": "add the suite to the template job's monitor.suites (the pipeline adds one per earlier round)",
}


def owned_key(key: str) -> str | None:
    """The pipeline-owned key that ``key`` sets (itself or a key under it), or None."""
    return next((k for k in OWNED if key == k or key.startswith(k + ".")), None)


def _probe_job(cfg, index: int, raw: dict) -> dict | None:
    """Round ``index``'s job as far as validation needs it (the owned keys filled); None: not a mapping of sections."""
    rnd = cfg.rounds[index]
    job = copy.deepcopy(raw)
    for section in ("model", "data", "training", "monitor"):
        if job.get(section) is None:
            job[section] = {}
        if not isinstance(job[section], dict):
            return None
    job["model"]["name_or_path"] = cfg.base_model
    job["data"]["train_files"] = list(rnd.train_files)
    job["data"]["eval_files"] = list(rnd.eval_files)
    job["training"].setdefault("output_dir", "<the template's training.output_dir>")  # rounds.py names it missing
    fmt = job["data"].get("format", "alpaca")
    suites = list(job["monitor"].get("suites") or [])
    suites += [{"name": e.name, "files": list(e.eval_files), "format": e.overrides.get("data.format", fmt),
                "metric": "nll", "max_relative_increase": cfg.retention_budget} for e in cfg.rounds[:index]]
    if suites:
        job["monitor"]["suites"] = suites
    ewc = job.get("ewc")  # carried forward as rounds.py does: update_after; lambda 0 while there is no Fisher
    if isinstance(ewc, dict) and float(ewc.get("lambda", ewc.get("lambda_", 0)) or 0) > 0:
        ewc["update_after"] = True
        if not (ewc.get("fisher_path") or ewc.get("fisher_data_files")):
            ewc.pop("lambda_", None)
            ewc["lambda"] = 0.0
    replay = job.get("replay")  # the pipeline adds the round's sample after a promotion
    if isinstance(replay, dict) and replay.get("buffer"):
        replay["update_after"] = False
        replay.pop("update_budget", None)
    return job


def check_overrides(cfg) -> None:
    """Refuse pipeline-owned keys in any round's overrides; validate the template, then each round's overrides.

    Raises:
        ConfigError: one line naming the pipeline file, ``rounds[i].overrides`` and the key; or the template job
            file and its key (an error of the template itself).
    """
    from distrib_ft.config import _set_dotted, config_from_dict
    from distrib_ft.retrain.rounds import read_template

    source = cfg.source or "<pipeline>"
    for i, rnd in enumerate(cfg.rounds):
        for key in rnd.overrides:
            owned = owned_key(key)
            if owned is not None:
                raise ConfigError(f"{source}: rounds[{i}].overrides: {key}: set by the pipeline, not by a round's "
                                  f"overrides; {OWNED[owned]}")
    raw = read_template(cfg.job)
    job = _probe_job(cfg, 0, raw)  # the template itself, with the keys the pipeline owns filled: every load
    if job is None:
        raise ConfigError(f"{cfg.job}: model, data, training and monitor must be sections (mappings) (the "
                          "pipeline's job)")
    try:
        config_from_dict(job, cfg.job)
    except ConfigError as e:
        raise ConfigError(f"{e} (the pipeline's job)") from None
    for i, rnd in enumerate(cfg.rounds):
        if not rnd.overrides:
            continue
        job = _probe_job(cfg, i, raw)
        if job is None:
            return  # the round's build names the template's bad section
        try:
            config_from_dict(copy.deepcopy(job), cfg.job)
        except ConfigError:
            continue  # an error of the round's retention suites (a template suite named like a round): rounds.py
        where = f"{source}: rounds[{i}].overrides"
        for key, value in rnd.overrides.items():
            _set_dotted(job, key, copy.deepcopy(value), where)
        config_from_dict(job, where)


_UNSET = object()


def decided_records(cfg) -> dict[str, dict]:
    """The round records in ``REGISTRY/rounds/`` (the rounds that reached a decision): ``{round name: record}``.

    A record is ``rounds/<name>.json`` holding a ``decision`` (R's row caches, ``<name>.eval.json``, hold none).
    Read from a folder or a URL (pyarrow.fs: https://arrow.apache.org/docs/python/filesystems.html).
    """
    import json

    from distrib_ft.runtime.storage import as_path

    folder = as_path(cfg.registry) / "rounds"
    if not folder.is_dir():
        return {}
    out: dict[str, dict] = {}
    for p in sorted(folder.iterdir(), key=str):
        if not str(p).endswith(".json") or str(p).endswith(".eval.json") or not p.is_file():
            continue
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{p}: not a round record (invalid JSON); remove it to run the round again") from None
        if isinstance(rec, dict) and rec.get("decision") and rec.get("name"):
            out[rec["name"]] = rec
    return out


def check_history(cfg) -> None:
    """The file against the rounds the registry has decided (issue 12), before anything trains.

    A round's name stands for what it trained, and each round is gated on the rounds before it in the file: a round
    that has not run, placed before one that has (a renamed or inserted round), would train from the current version
    gated on only part of the history; a promoted round taken out of the file would drop its retention suite.
    Removing a refused round (docs/scheduling.md's way past a refusal) is fine. A decided round's overrides must be
    those it ran with (its record's ``overrides``; a record without the key, written before they were recorded,
    is not compared): an edited learning rate on a refused round would otherwise print the old refusal again.

    Raises:
        ConfigError: one line naming the pipeline file, the round(s) and what to do.
    """
    import json

    source = cfg.source or "<pipeline>"
    records = decided_records(cfg)
    names = [r.name for r in cfg.rounds]
    for name, rec in sorted(records.items()):
        if name not in names and rec.get("decision") == "promoted":
            raise ConfigError(f"{source}: round {name} was promoted ({rec.get('version')}, "
                              f"{cfg.registry}/rounds/{name}.json) but is no longer in the file; keep decided rounds "
                              "in the file; only a refused round may be removed")
    for i, rnd in enumerate(cfg.rounds):
        rec = records.get(rnd.name)
        if rec is None or "overrides" not in rec:  # a record written before overrides were recorded: unknown
            continue
        was, now = rec["overrides"] or {}, json.loads(json.dumps(rnd.overrides))
        changed = [f"{k}: {json.dumps(was[k]) if k in was else 'unset'} then, "
                   f"{json.dumps(now[k]) if k in now else 'unset'} now"
                   for k in sorted(set(was) | set(now)) if was.get(k, _UNSET) != now.get(k, _UNSET)]
        if changed:
            raise ConfigError(f"{source}: rounds[{i}] ({rnd.name}): overrides changed since the round ran "
                              f"({'; '.join(changed)}); give the round a new name")
    for i, name in enumerate(names):
        later = [n for n in names[i + 1:] if n in records]
        if name not in records and later:
            raise ConfigError(f"{source}: rounds[{i}] ({name}) has not run but rounds after it ({', '.join(later)}) "
                              "have; append new rounds at the end (a decided round's name stands for what it "
                              "trained)")
