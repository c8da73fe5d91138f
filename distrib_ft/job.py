"""The job resolved once, on the driver: what every worker receives and runs without resolving again.

``resolve(config, world_size)`` turns a validated :class:`~distrib_ft.config.JobConfig` into a
:class:`Job` without touching the config: every path field (marked ``InputPath`` / ``OutputPath`` /
``StorePath`` where it is declared) made absolute and, for inputs, checked to exist; the ``offline:``
model name replaced by its converted folder; the DeepSpeed JSON merged with the job for this world
size; the method's ZeRO support and each defence's own inputs checked. Errors are one line naming the
job file and the key (ConfigError, DataError or DeepSpeedConfigError: exit code 2).
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from distrib_ft.config import PROJECT_ROOT, JobConfig
from distrib_ft.data.check import check_files
from distrib_ft.methods import METHODS, build_method
from distrib_ft.model import adaptable_modules
from distrib_ft.preservation import DEFENCES
from distrib_ft.runtime.engine import load_deepspeed_config, zero_stage
from distrib_ft.schema import ConfigError, PathKind, section_class

# training keys a resumed run may change; everything else must match the checkpoint's job.
RESUMABLE = {"output_dir", "max_steps", "num_train_epochs", "logging_steps", "save_steps", "save_total_limit",
             "eval_steps", "report_to", "per_device_eval_batch_size"}


@dataclass(frozen=True)
class Job:
    """A job ready to run: its config with every path absolute, and the DeepSpeed dict for ``world_size``."""

    config: JobConfig
    deepspeed: dict
    world_size: int

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.deepspeed)

    @property
    def global_batch(self) -> int:
        t = self.config.training
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.world_size

    def owner(self) -> dict:
        """What every checkpoint records of the job that wrote it (``job.json``).

        The geometry, and the resolved job less what a resume may change (where it writes, how long it runs,
        how often it logs and saves).
        """
        free = {"source": True, "training": RESUMABLE,
                "distributed": {"num_workers", "cpus_per_worker", "max_failures", "collective_timeout_s"},
                # keys a defence checks against its own checkpoint state (e.g. replay's buffer version)
                **{d.name: set(d.config_class.resume_checked) for d in DEFENCES
                   if getattr(d.config_class, "resume_checked", None)}}
        job = self.config.model_dump(mode="json", by_alias=True, exclude=free)
        t = self.config.training  # the run's length: a re-submit without --resume must not change it silently
        schedule = {"training.max_steps": t.max_steps, "training.num_train_epochs": t.num_train_epochs}
        return {"world_size": self.world_size, "global_batch": self.global_batch, "job": job, "schedule": schedule}


def resolve(config: JobConfig, world_size: int | None = None) -> Job:
    """The :class:`Job` of ``config`` on ``world_size`` workers (default ``distributed.num_workers``).

    Raises:
        ConfigError: a missing file or model folder, or a method that cannot run on this ZeRO stage.
        DeepSpeedConfigError: the DeepSpeed JSON does not fit the job.
        DataError: a defence's input (e.g. a replay buffer version) does not exist.
    """
    source = config.source or "<config>"
    raw = config.model_dump(mode="python", by_alias=True)
    _resolve_paths(type(config), raw, "", source)
    raw["model"]["name_or_path"] = _model_folder(raw["model"]["name_or_path"], source,
                                                 raw["model"].get("trust_remote_code", False))
    resolved = JobConfig.model_validate(raw)
    world = world_size or resolved.distributed.num_workers
    ds = deepspeed_config(resolved, world)
    method, stage = build_method(resolved.method), zero_stage(ds)
    try:
        if stage not in method.zero_stages:
            raise ValueError(f"method.type: {method.name} supports ZeRO stages {sorted(method.zero_stages)}; "
                             f"distributed.deepspeed is ZeRO-{stage}")
        method.check(zero_stage=stage, module_names=adaptable_modules(resolved.model.name_or_path,
                                                                     resolved.model.trust_remote_code),
                     config=resolved)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    tokenizer = _tokenizer(resolved.model.name_or_path, resolved.model.trust_remote_code, source)
    _check_data(resolved, tokenizer)
    for defence in DEFENCES:
        section = getattr(resolved, defence.name)
        if section.enabled and hasattr(defence, "preflight"):
            defence.preflight(section, resolved, tokenizer)
    return Job(config=resolved, deepspeed=ds, world_size=world)


def deepspeed_config(config: JobConfig, world: int) -> dict:
    """The DeepSpeed dict of a resolved ``config`` on ``world`` workers.

    Also for a resume at another world size (distrib_ft/runtime/reshard.py). Raises DeepSpeedConfigError.
    """
    t = config.training
    return load_deepspeed_config(config.distributed.deepspeed, micro_batch_size=t.per_device_train_batch_size,
                                 gradient_accumulation_steps=t.gradient_accumulation_steps, world_size=world,
                                 max_grad_norm=t.max_grad_norm, bf16=t.bf16, learning_rate=t.learning_rate,
                                 weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)


def _tokenizer(name_or_path: str, trust_remote_code: bool, source: str):
    """The model's tokenizer for the driver's data check, or None when it cannot be loaded here (a hub id).

    Raises:
        ConfigError: a local model folder whose tokenizer does not load (the workers could not load it either).
    """
    from distrib_ft.model import load_tokenizer

    try:
        return load_tokenizer(name_or_path, trust_remote_code)
    except Exception as e:
        if Path(name_or_path).is_dir():
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(f"{source}: model.name_or_path: the tokenizer in {name_or_path} does not load "
                              f"({type(e).__name__}: {first}); save the model's tokenizer in that folder") from None
        if isinstance(e, (OSError, ValueError)):
            return None
        raise


def _check_data(config: JobConfig, tokenizer) -> None:
    """The first records of the new task's files and of every retention suite (DataError, exit 2)."""
    d = config.data
    common = dict(tokenizer=tokenizer, max_seq_length=d.max_seq_length, prompt_template=d.prompt_template,
                  text_field=d.text_field)
    check_files(d.train_files, d.format, key="data.train_files", need_targets=True, **common)
    if d.eval_files:
        check_files(d.eval_files, d.format, key="data.eval_files", need_targets=True, **common)
    for i, suite in enumerate(config.monitor.suites):
        check_files(suite.files, suite.format, key=f"monitor.suites[{i}].files",
                    **{**common, "tokenizer": tokenizer if suite.metric == "nll" else None})


def _path_kind(field) -> str | None:
    for meta in field.metadata:
        if isinstance(meta, PathKind):
            return meta.kind

    def scan(tp) -> str | None:
        for m in getattr(tp, "__metadata__", ()):
            if isinstance(m, PathKind):
                return m.kind
        return next((k for a in typing.get_args(tp) if (k := scan(a))), None)

    return scan(field.annotation)


def _section_class(field, value: dict) -> type[BaseModel] | None:
    """The config class of a nested section (for the method union: the member named by ``type``)."""
    cls = section_class(field.annotation)
    if cls in {m.config_class for m in METHODS.values()}:
        return METHODS[value["type"]].config_class if value.get("type") in METHODS else None
    return cls


def _resolve_paths(cls: type[BaseModel], raw: dict, prefix: str, source: str) -> None:
    for name, field in cls.model_fields.items():
        key = field.alias or name
        value = raw.get(key)
        if value is None:
            continue
        kind = _path_kind(field)
        if kind is not None:
            if isinstance(value, list):
                raw[key] = [_resolve_one(v, kind, f"{prefix}{key}[{i}]", source) for i, v in enumerate(value)]
            else:
                raw[key] = _resolve_one(value, kind, f"{prefix}{key}", source)
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            sub = _section_class(field, item) if isinstance(item, dict) else None
            if sub is not None:
                where = f"{prefix}{key}[{i}]." if isinstance(value, list) else f"{prefix}{key}."
                _resolve_paths(sub, item, where, source)


def _candidates(path: str, source: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_absolute():
        return [p]
    bases = [Path(source).resolve().parent] if source and not source.startswith("<") else []
    return list(dict.fromkeys(b / p for b in (*bases, Path.cwd(), PROJECT_ROOT)))  # once each (cwd may be the folder)


# Schemes pyarrow.fs opens itself; fsspec's registry adds the rest (gcs, abfs, http, ...).
_PYARROW_SCHEMES = {"file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/+)")


def _check_url(value: str, key: str, source: str) -> None:
    """Refuse what only looks like a URL: an unknown scheme, or ``s3:/bucket`` (one slash: a local folder ``s3:``)."""
    m = _SCHEME.match(value)
    if m is None:
        return
    scheme = m.group(1).lower()
    if m.group(2) == "/":
        raise ConfigError(f"{source}: {key}: {value} is a URL with one slash (it would be a local folder named "
                          f"'{m.group(1)}:'); write {m.group(1)}://{value[m.end():]}")
    from fsspec.registry import known_implementations

    if scheme not in _PYARROW_SCHEMES and scheme not in known_implementations:
        raise ConfigError(f"{source}: {key}: {value}: unknown filesystem '{m.group(1)}://'; use a local path or "
                          "a URL such as s3://, gs://, hdfs://")


def _resolve_one(value: str, kind: str, key: str, source: str) -> str:
    _check_url(value, key, source)
    if "://" in value:  # a URL: the filesystem library resolves it
        return value
    if kind == "output":
        out = (Path.cwd() / Path(value).expanduser()).resolve()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{source}: {key}: {value} is a file, not a folder")
        return str(out)
    found = next((c for c in _candidates(value, source) if c.exists()), None)
    if found is not None:
        return str(found.resolve())
    if kind == "input":
        where = ", ".join(str(c.parent) for c in _candidates(value, source))
        raise ConfigError(f"{source}: {key}: {value} not found (looked in {where})")
    return str((Path.cwd() / Path(value).expanduser()).resolve())


def _model_folder(name: str, source: str, trust_remote_code: bool = False) -> str:
    """The model's folder or hub id, as the workers load it.

    ``offline:NAME`` -> its converted folder; a local path -> absolute (it must hold a config.json that
    transformers reads); a hub id stays as it is.
    """
    if name.startswith("offline:"):
        from distrib_ft.model import resolve_offline_model

        try:
            return str(resolve_offline_model(name))
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            raise ConfigError(f"{source}: {e}") from None
    if name.startswith((".", "/", "~")) or Path(name).exists():
        found = next((c for c in _candidates(name, source) if c.exists()), None)
        if found is None or not (found / "config.json").is_file():
            raise ConfigError(f"{source}: model.name_or_path: {name} is not a Hugging Face model folder "
                              "(no config.json)")
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(found, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(f"{source}: model.name_or_path: {found / 'config.json'} cannot be read "
                              f"({type(e).__name__}: {first})") from None
        return str(found.resolve())
    return name
