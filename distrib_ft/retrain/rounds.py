"""One round's job: the template job file with the round's data, its starting model and the defences carried forward.

Follows the design of issue 12 (``distrib-ft retrain``). From the template's raw YAML:

- ``model.name_or_path``: the pipeline's ``base_model`` while nothing is current. After that it depends on what the
  method leaves in final/ (the registry's artifact kind): full / partial / bitfit (a whole Hugging Face model): the
  current version's model folder; LoRA / DoRA / QLoRA (a peft adapter): ``base_model`` with
  ``method.merge_adapters`` = the adapters of the current version's lineage, oldest first (the base with the earlier
  adapters merged, as EWC-LoRA needs). Prompt tuning and bottleneck adapters leave an artifact that neither loads as
  a model nor merges into one: refused with one line.
- ``data.train_files`` / ``data.eval_files``: the round's; ``monitor.suites``: the template's plus one NLL suite per
  earlier round (its eval_files, ``max_relative_increase: retention_budget``), so the gate sees every past skill.
- ``training.output_dir``: ``<template output_dir>/<round name>``.
- EWC (template ``ewc.lambda > 0``): ``update_after: true`` (final/fisher.safetensors, merged online with gamma, is
  what the next round reads); once a version is current, ``fisher_path`` = its model/fisher.safetensors.
- Replay (template ``replay.buffer``): ``replay.version`` pinned to the buffer's newest version, ``update_after``
  off: the pipeline adds a sample of the round's data only after the round is promoted (distrib_ft/retrain/pipeline.py).
- then the round's ``overrides``.

Registry artifacts are used from a local registry in place; from a URL they are downloaded to
``<cache>/retrain/<registry hash>/<version>/model``, once per content: the copy is keyed on the version's identity
(``created``, source and the artifact's files and sizes from version.json) and downloaded again when that differs.
The job is written to ``<cache>/retrain/<registry hash>/jobs/<round>.yaml``. The same pipeline file and registry
state give a byte-identical job, so a killed round submitted again resumes through ``distrib-ft train``'s own
"unfinished run of this job" logic.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distrib_ft.schema import ConfigError, load_yaml_unique

FULL_METHODS = ("full", "partial", "bitfit")  # final/ is a whole Hugging Face model
ADAPTER_METHODS = ("lora", "qlora")  # final/ is a peft LoRA / DoRA adapter that merges into the base
FISHER = "fisher.safetensors"


@dataclass
class RoundJob:
    """A built round: the job dict, where it was written, and what the pipeline does after the round."""

    name: str
    index: int
    job: dict
    path: Path | None
    kind: str  # "full" or "adapter": what the round's final/ is
    parent: str | None  # the current version it starts from
    lineage: list[str] = field(default_factory=list)  # adapters' versions merged into the base, oldest first
    replay_buffer: str | None = None  # carried forward after a promotion
    replay_budget: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> str:
        return self.job["training"]["output_dir"]


def registry_hash(root) -> str:
    """A short name for a registry (its absolute path or URL) in the project cache."""
    return hashlib.sha256(str(root).encode()).hexdigest()[:16]


def work_root(registry) -> Path:
    """``<project cache>/retrain/<registry hash>``: the built jobs and local copies of a URL registry's artifacts."""
    from distrib_ft.runtime.dist import cache_dir

    return cache_dir() / "retrain" / registry_hash(registry.root)


def version_identity(version) -> str:
    """What identifies a registry version's content (a sha256).

    Its ``version.json`` fields fixed at ``add`` (version, created, source, parent) and the artifact's files with
    their sizes; the decision fields (which promote / refuse rewrite) are left out. A registry recreated at the same
    URL gives its v0001 another identity.
    """
    r = version.record
    key = {k: r.get(k) for k in ("version", "created", "source", "parent")}
    key["files"] = (r.get("artifact") or {}).get("files")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def tree_identity(url) -> str:
    """What identifies the content of a folder on a URL (a sha256).

    Every file's path, size and modification time (pyarrow.fs ``FileInfo``:
    https://arrow.apache.org/docs/python/generated/pyarrow.fs.FileInfo.html).
    """
    import pyarrow.fs as pafs

    fs, path = url._fs()
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    rows = sorted((i.path[len(path):].lstrip("/"), i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def refresh_copy(src, target: Path, identity: str, what: str) -> Path:
    """Make ``target`` a local copy of URL folder ``src`` whose content is ``identity``.

    The identity is kept in ``<target>.identity`` (written last, atomically); a copy made for another identity (the
    URL's content changed: a registry recreated at the same URL, two endpoints with one bucket name) is downloaded
    again, said in one stderr line.
    """
    from distrib_ft.runtime.storage import COMPLETE, atomic_write_text, download_tree

    done = target.with_name(target.name + ".identity")
    have = done.read_text().strip() if done.is_file() else None
    if have == identity and target.is_dir():
        return target
    if have is not None:
        print(f"distrib-ft retrain: {src}: the local copy {target} was made from other content ({what} changed "
              "since: a registry recreated at the same URL?); downloading it again", file=sys.stderr, flush=True)
    done.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    download_tree(src, tmp)
    (tmp / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    atomic_write_text(done, identity + "\n")
    return target


def local_model(registry, version) -> Path:
    """A local folder holding ``version``'s model: the registry's own folder, or a copy of a URL registry's.

    The copy is downloaded once per content (:func:`version_identity`), compared on every use.
    """
    from distrib_ft.runtime.storage import UrlPath

    if not isinstance(registry.root, UrlPath):
        return Path(version.model)
    target = work_root(registry) / version.version / "model"
    return refresh_copy(UrlPath(version.model), target, version_identity(version), f"version {version.version}")


def method_kind(method: dict, source: str) -> str:
    """``full`` or ``adapter``: what a method's final/ is; ConfigError for methods a pipeline cannot chain."""
    from distrib_ft.methods import DEFAULT

    name = method.get("type", DEFAULT)
    if name == "bitfit" and method.get("add_bias"):
        raise ConfigError(f"{source}: method.add_bias: bitfit with added biases leaves a peft BEFT adapter in final/, "
                          "which the next round can neither load as a model nor merge (method.merge_adapters takes "
                          "LoRA); use bitfit without add_bias, lora or full")
    if name in FULL_METHODS:
        return "full"
    if name in ADAPTER_METHODS:
        return "adapter"
    raise ConfigError(f"{source}: method.type: {name} cannot be retrained in rounds: its final/ is neither a whole "
                      "model the next round starts from nor a LoRA adapter it merges into the base (use lora, qlora, "
                      "full, partial or bitfit)")


def read_template(path: str) -> dict:
    """The template job's raw YAML (a mapping). Raises ConfigError."""
    p = Path(path)
    try:
        raw = load_yaml_unique(p.read_text()) or {}
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not a valid job file ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _effective(raw: dict, overrides: dict, source: str) -> dict:
    """The template with the round's overrides applied (to read what the round's method and defences are)."""
    from distrib_ft.config import _set_dotted

    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        _set_dotted(out, key, copy.deepcopy(value), source)
    return out


def lineage(registry, current) -> list:
    """The current version and its parents, oldest first."""
    chain, v, seen = [], current, set()
    while v is not None and v.version not in seen:
        seen.add(v.version)
        chain.append(v)
        v = registry.show(v.parent) if v.parent else None
    return chain[::-1]


def build_round(cfg, index: int, registry, *, write: bool = True) -> RoundJob:
    """Build round ``index`` of pipeline ``cfg`` from the template and ``registry``'s current version.

    Args:
        cfg: the resolved :class:`~distrib_ft.retrain.config.PipelineConfig`.
        index: the round's position in ``cfg.rounds``.
        registry: the :class:`~distrib_ft.registry.Registry`.
        write: write the job to ``<work dir>/jobs/<round>.yaml`` (only when its text changed).

    Raises:
        ConfigError: a method that cannot chain, a template suite named like a round, a current version whose
            artifact is not what the template's method leaves.
    """
    from distrib_ft.config import JobConfig, _set_dotted
    from distrib_ft.job import _resolve_paths
    from distrib_ft.methods import DEFAULT

    rnd = cfg.rounds[index]
    source = cfg.job
    raw = read_template(source)
    eff = _effective(raw, rnd.overrides, source)
    kind = method_kind(eff.get("method") or {}, source)
    job = copy.deepcopy(raw)
    for section in ("model", "method", "data", "training", "monitor"):
        if job.get(section) is None:
            job[section] = {}
        if not isinstance(job[section], dict):
            raise ConfigError(f"{source}: {section}: must be a section (a mapping)")
    job["method"].setdefault("type", DEFAULT)
    job["data"]["train_files"] = list(rnd.train_files)
    job["data"]["eval_files"] = list(rnd.eval_files)
    if "output_dir" not in job["training"]:
        raise ConfigError(f"{source}: training.output_dir: required key is missing (each round writes to "
                          "<output_dir>/<round name>)")
    _resolve_paths(JobConfig, job, "", source)  # the template's own relative paths, against the template's folder
    notes: list[str] = []

    # the starting model
    current = registry.current()
    chain: list = []
    job["model"]["name_or_path"] = cfg.base_model
    if current is not None:
        have = (current.record.get("artifact") or {}).get("kind")
        if have and have != kind:
            what = {"adapter": "an adapter", "full": "a whole model"}
            raise ConfigError(f"{source}: method.type: {eff['method'].get('type', DEFAULT)} leaves "
                              f"{what[kind]}, but the current version {current.version} of {registry.root} is "
                              f"{what.get(have, have)}; use the method the earlier rounds used, or a new registry")
        if kind == "full":
            job["model"]["name_or_path"] = str(local_model(registry, current))
        else:
            chain = lineage(registry, current)
            job["method"]["merge_adapters"] = [str(local_model(registry, v)) for v in chain]

    # retention suites: one per earlier round
    fmt = job["data"].get("format", "alpaca")
    suites = list(job["monitor"].get("suites") or [])
    taken = {s.get("name") for s in suites if isinstance(s, dict)}
    for earlier in cfg.rounds[:index]:
        if earlier.name in taken:
            raise ConfigError(f"{source}: monitor.suites: a suite is named {earlier.name!r}, like a round of "
                              f"{cfg.source}; rename the suite (each earlier round adds a suite named after it)")
        suites.append({"name": earlier.name, "files": list(earlier.eval_files),
                       "format": earlier.overrides.get("data.format", fmt), "metric": "nll",
                       "max_relative_increase": cfg.retention_budget})
    if suites:
        job["monitor"]["suites"] = suites

    out = str(job["training"]["output_dir"]).rstrip("/")
    job["training"]["output_dir"] = f"{out}/{rnd.name}"

    # EWC carried forward
    ewc = eff.get("ewc") or {}
    if isinstance(ewc, dict) and float(ewc.get("lambda", ewc.get("lambda_", 0)) or 0) > 0:
        if kind == "adapter" and ewc.get("target", "trainable") != "lora_merged":
            raise ConfigError(f"{source}: ewc.target: {ewc.get('target', 'trainable')} cannot be carried across "
                              "rounds of an adapter method (each round trains a fresh adapter on the merged earlier "
                              "ones, so the anchors of an earlier adapter do not apply); use ewc.target: lora_merged")
        section = job.setdefault("ewc", {})
        if "lambda_" in section:
            section["lambda"] = section.pop("lambda_")
        section["update_after"] = True
        fisher = local_model(registry, current) / FISHER if current is not None else None
        if fisher is not None and fisher.is_file():
            section["fisher_path"] = str(fisher)
            section.pop("fisher_data_files", None)
        elif fisher is not None:
            notes.append(f"round {rnd.name}: ewc: the current version {current.version} has no {FISHER} (it was "
                         "trained without ewc.update_after); the template's Fisher source is used")
        if not (section.get("fisher_path") or section.get("fisher_data_files")):
            section["lambda"] = 0.0
            notes.append(f"round {rnd.name}: ewc.lambda 0 (nothing to protect yet); its Fisher is written for the "
                         "next round")

    # replay carried forward
    replay = eff.get("replay") or {}
    buffer = budget = None
    if isinstance(replay, dict) and replay.get("buffer"):
        from distrib_ft.data import replay_buffer as rb

        section = job.setdefault("replay", {})
        buffer = str(section.get("buffer") or replay["buffer"])
        budget = replay.get("update_budget")
        section["update_after"] = False  # the pipeline adds the round's sample after a promotion, never before
        section.pop("update_budget", None)
        versions = rb.list_versions(buffer)
        ratio = float(replay.get("ratio", 0) or 0)
        if versions and ratio > 0:
            section["version"] = versions[-1]
        else:
            if ratio > 0:
                notes.append(f"round {rnd.name}: replay: {buffer} has no version yet, so this round replays nothing; "
                             "a sample of its data is added once it is promoted")
            job.pop("replay")

    for key, value in rnd.overrides.items():
        _set_dotted(job, key, copy.deepcopy(value), source)

    built = RoundJob(name=rnd.name, index=index, job=job, path=None, kind=kind,
                     parent=current.version if current is not None else None, lineage=[v.version for v in chain],
                     replay_buffer=buffer, replay_budget=budget, notes=notes)
    if write:
        built.path = write_job(registry, rnd.name, job)
    return built


def job_text(job: dict) -> str:
    """The YAML of a built job (keys in the template's order: deterministic)."""
    return yaml.safe_dump(job, sort_keys=False)


def write_job(registry, name: str, job: dict) -> Path:
    """Write ``job`` to ``<work dir>/jobs/<name>.yaml`` (atomically, only when its text changed)."""
    from distrib_ft.runtime.storage import atomic_write_text

    path = work_root(registry) / "jobs" / f"{name}.yaml"
    text = job_text(job)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path
