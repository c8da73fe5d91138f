"""The pipeline file of ``distrib-ft retrain``: a registry, a base model, a template job and the rounds.

Validated strictly (pydantic, unknown keys are errors, as the job file in distrib_ft/config.py); an error is one
line naming the pipeline file and the key (``pipeline.yaml: rounds[1].train_files: required key is missing``), exit
code 2. Paths follow the job file's rules (distrib_ft/job.py): inputs (``job``, a round's data files, a ``base_model``
folder) resolve against the pipeline file's folder, then the working directory, then the project, and must exist;
the ``registry`` is an output and resolves against the working directory, like ``training.output_dir``. URLs
(``s3://...``) are kept as they are (read through pyarrow.fs: https://arrow.apache.org/docs/python/filesystems.html).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from distrib_ft.schema import ConfigError, Strict

ROUND_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class RoundConfig(Strict):
    """One round: the new data it trains on and its held-out set (which later rounds keep as a retention suite)."""

    name: str = Field(description=(
        "Unique name of the round ([A-Za-z0-9_.-], not starting with '.' or '-'); recorded in the registry. A round "
        "that ran keeps its name: new data goes into a new round."))
    train_files: list[str] = Field(min_length=1, description="The round's training data (data.train_files).")
    eval_files: list[str] = Field(min_length=1, description=(
        "The round's held-out set: its new-task eval set now, a retention suite of every later round."))
    overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "Job keys set for this round only, dotted as on the command line: {training.learning_rate: 1.0e-4}."))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ROUND_NAME.match(value):
            raise ValueError(f"{value!r} is not a round name: use letters, digits, '_', '.', '-'")
        return value

    @field_validator("overrides")
    @classmethod
    def _dotted(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$", key):
                raise ValueError(f"{key!r}: an override key is section.key (e.g. training.learning_rate)")
        return value


class PipelineConfig(Strict):
    """``distrib-ft retrain``'s file: where versions live, where round 1 starts, the template job and the rounds."""

    registry: str = Field(description=(
        "The model registry (distrib_ft/registry.py): a folder (relative to the working directory) or a URL."))
    base_model: str = Field(description=(
        "The model round 1 starts from, as model.name_or_path takes it: offline:NAME, a Hugging Face folder "
        "(relative to the pipeline file) or a hub id."))
    job: str = Field(description=(
        "The template job file (any job: method, defences, training, distributed, monitor), relative to the "
        "pipeline file; each round's job is built from it."))
    retention_budget: float = Field(gt=0, description=(
        "max_relative_increase (NLL) of the retention suites added for the earlier rounds' held-out sets."))
    merge_back: bool = Field(False, description=(
        "When a round breaks the budget but learned its task: try theta0 + alpha (theta - theta0) for "
        "merge_back_alphas and promote the largest alpha within budget (WiSE-FT-style), else refuse."))
    merge_back_alphas: list[float] = Field(default_factory=lambda: [0.75, 0.5, 0.25], min_length=1, description=(
        "The alphas merge_back tries, each in (0, 1); tried largest first."))
    rounds: list[RoundConfig] = Field(min_length=1, description="The rounds, in the order they run.")
    source: str | None = Field(None, description="(set by the loader) the pipeline file this came from.")

    @field_validator("merge_back_alphas")
    @classmethod
    def _alphas(cls, value: list[float]) -> list[float]:
        for a in value:
            if not 0 < a < 1:
                raise ValueError(f"{a}: each alpha must be in (0, 1) (1 is the candidate itself, 0 its start)")
        return sorted(set(value), reverse=True)

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineConfig:
        seen: dict[str, int] = {}
        for i, r in enumerate(self.rounds):
            if r.name in seen:
                raise ValueError(f"rounds[{i}].name: {r.name!r} is also rounds[{seen[r.name]}]'s; names are unique")
            seen[r.name] = i
        return self

    def round_index(self, name: str) -> int:
        """The position of round ``name``. Raises ConfigError: no such round (names the known ones)."""
        for i, r in enumerate(self.rounds):
            if r.name == name:
                return i
        raise ConfigError(f"{self.source}: --round {name}: no such round (rounds: "
                          f"{', '.join(r.name for r in self.rounds)})")


def _input(value: str, key: str, source: str) -> str:
    """An input path: a URL as it is, else absolute (the pipeline's folder, the working directory, the project)."""
    from distrib_ft.job import _candidates, _check_url

    _check_url(value, key, source)
    if "://" in value:
        return value
    found = next((c for c in _candidates(value, source) if c.exists()), None)
    if found is None:
        where = ", ".join(str(c.parent) for c in _candidates(value, source))
        raise ConfigError(f"{source}: {key}: {value} not found (looked in {where})")
    return str(found.resolve())


def _model(value: str, source: str) -> str:
    """``base_model``: offline:NAME and hub ids as they are; a folder absolute (it must exist)."""
    if value.startswith("offline:") or "://" in value:
        return value
    if value.startswith((".", "/", "~")) or any(c.exists() for c in _candidates_of(value, source)):
        return _input(value, "base_model", source)
    return value  # a hub id


def _candidates_of(value: str, source: str) -> list[Path]:
    from distrib_ft.job import _candidates

    return _candidates(value, source)


def resolve_paths(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every path made absolute (inputs checked to exist); URLs kept. Raises ConfigError."""
    from distrib_ft.job import _check_url

    source = cfg.source or "<pipeline>"
    _check_url(cfg.registry, "registry", source)
    registry = cfg.registry if "://" in cfg.registry else str((Path.cwd() / Path(cfg.registry).expanduser()).resolve())
    rounds = []
    for i, r in enumerate(cfg.rounds):
        rounds.append(r.model_copy(update={
            "train_files": [_input(f, f"rounds[{i}].train_files[{j}]", source) for j, f in enumerate(r.train_files)],
            "eval_files": [_input(f, f"rounds[{i}].eval_files[{j}]", source) for j, f in enumerate(r.eval_files)]}))
    job = _input(cfg.job, "job", source)
    if "://" in job:
        raise ConfigError(f"{source}: job: {cfg.job}: the template job must be a local file")
    return cfg.model_copy(update={"registry": registry, "base_model": _model(cfg.base_model, source), "job": job,
                                  "rounds": rounds})


def load_pipeline(path) -> PipelineConfig:
    """Read, validate and resolve a pipeline file, and check every round's overrides (distrib_ft/retrain/checks.py).

    Raises ConfigError with a one-line message (exit code 2).
    """
    from distrib_ft.config import format_validation, read_yaml_mapping  # imports the methods (torch): not at import

    source = str(path)
    raw = read_yaml_mapping(path, "pipeline file", "keys (registry, base_model, job, rounds, ...)")
    try:
        cfg = PipelineConfig.model_validate({**raw, "source": source})
    except ValidationError as e:
        raise ConfigError(format_validation(e, source, PipelineConfig)) from None
    cfg = resolve_paths(cfg)
    from distrib_ft.retrain.checks import check_overrides

    check_overrides(cfg)  # every round's overrides, before anything trains
    return cfg
