"""The job config: one YAML file per job, validated strictly before any worker starts.

Sections mirror the layout of a job: ``model``, ``method`` (a union over the methods registry,
distrib_ft/methods/, chosen by ``method.type``), ``data``, ``training`` (Hugging Face
``TrainingArguments`` names), ``distributed``, ``monitor``, and one section per defence (its config
class lives in its file in distrib_ft/preservation/). Every model forbids unknown keys, so a typo is an
error that names the dotted key and the file. ``section.key=value`` overrides are applied to the
raw YAML before validation; values are parsed as YAML (``training.bf16=false``,
``method.target_modules=[q_proj,v_proj]``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from distrib_ft.methods import DEFAULT, METHODS
from distrib_ft.preservation import DEFENCES
from distrib_ft.schema import (
    ConfigError,
    DuplicateKeyError,
    InputPath,
    OutputPath,
    Strict,
    load_yaml_unique,
    section_class,
)


class ModelConfig(Strict):
    name_or_path: str = Field(description="Local Hugging Face causal-LM folder or hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights are loaded in; DeepSpeed bf16 casts as needed.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto = flash_attention_2 when flash-attn is installed and CUDA is used, else sdpa.")
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained.")


class DataConfig(Strict):
    train_files: list[InputPath] = Field(description="JSONL / Parquet files or saved `datasets` directories.")
    eval_files: list[InputPath] = Field(default_factory=list, description="Held-out files of the new task.")
    format: Literal["alpaca", "chat", "text", "tokenized"] = Field(
        "alpaca", description=(
            "alpaca (instruction, input, output), chat (messages), text, tokenized (input_ids[, labels])."))
    max_seq_length: int = Field(512, ge=8, description="Longer sequences are truncated (and counted in the log).")
    packing: bool = Field(False, description="Concatenate examples into max_seq_length blocks.")
    prompt_template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description=(
            "How alpaca records are rendered: the model's chat template (auto when it has one) or the Alpaca prompt."))
    streaming: bool = Field(False, description="Stream the files instead of preparing them in memory (large data).")
    text_field: str = Field("text", description="Field holding the text for format=text.")

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if not self.train_files:
            raise ValueError("data.train_files is empty: list at least one file")
        return self


class TrainingConfig(Strict):
    output_dir: OutputPath = Field(description=(
        "Everything the job writes goes here: a local folder (shared by all nodes), or a URL of any filesystem "
        "pyarrow supports (s3://, gs://, hdfs://; S3 keys and endpoint from the AWS_* variables), which needs no "
        "shared mount: each node works in a local staging folder and uploads (distrib_ft/runtime/storage.py)."))
    max_steps: int = Field(-1, description="Optimizer steps; -1 = derive from num_train_epochs.")
    num_train_epochs: float = Field(1.0, gt=0, description="Used when max_steps is -1.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Micro-batch size per worker.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Eval batch size per worker.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of max_steps spent in linear warmup.")
    warmup_steps: int = Field(0, ge=0, description="Warmup steps; overrides warmup_ratio when > 0.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    bf16: bool = Field(True, description="bf16 mixed precision through DeepSpeed (fp32 master weights).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    logging_steps: int = Field(10, ge=1, description="Write a metrics.jsonl line every N steps.")
    save_steps: int = Field(0, ge=0, description=(
        "Checkpoint every N steps and at the end; 0 = no checkpoints (final/ only)."))
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (newest).")
    eval_steps: int = Field(0, ge=0, description="Evaluate on data.eval_files every N steps; 0 = only at the end.")
    seed: int = Field(42, description="Seeds model init, dropout and the data order.")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list, description=(
        "Loggers beside metrics.jsonl, with the same names: tensorboard (output_dir/runs) and mlflow "
        "(MLFLOW_TRACKING_URI, else a local file store in output_dir/mlruns)."))


class DistributedConfig(Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU, or CPU slots).")
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto = GPUs when the Ray cluster has them.")
    cpus_per_worker: int = Field(1, ge=1, description="CPU cores (and OMP threads) per worker.")
    deepspeed: InputPath = Field("ds_configs/zero2.json", description=(
        "DeepSpeed JSON; relative paths resolve against the job file, then the project."))
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl with GPUs, else gloo.")
    max_failures: int = Field(2, ge=0, description=(
        "Ray launcher: restart the workers this many times when one dies or fails (Ray Train's "
        "FailureConfig.max_failures); each restart resumes from the newest complete checkpoint; 0 = no recovery."))
    collective_timeout_s: int = Field(1800, ge=1, description=(
        "Seconds a collective (all-reduce, barrier) may wait for the other workers before the attempt ends "
        "(a hung or lost worker; torch.distributed's process-group timeout, Ray's TorchConfig.timeout_s)."))


LOSS_METRICS = ("nll",)
SCORE_METRICS = ("exact_match", "contains", "regex", "multiple_choice")


class SuiteConfig(Strict):
    """A held-out set of an old skill, measured from step 0 with a budget on how much it may degrade."""

    name: str = Field(description="Shown in metrics.jsonl (retention/<name>), the report and the plots.")
    files: list[InputPath] = Field(min_length=1, description="Data files of the skill (any data format).")
    format: Literal["alpaca", "chat", "text", "tokenized"] = Field("alpaca", description="Format of files.")
    metric: Literal["nll", "exact_match", "contains", "regex", "multiple_choice"] = Field(
        "nll", description=(
            "nll: mean token NLL (lower is better); the others score greedy generations (higher is better)."))
    pattern: str | None = Field(None, description="metric=regex: the pattern (default: the reference).")
    max_examples: int = Field(256, ge=1, description="At most this many examples are evaluated.")
    max_new_tokens: int = Field(32, ge=1, description="Generation length for the generation metrics.")
    max_relative_increase: float | None = Field(None, gt=0, description=(
        "Budget of a loss metric: at most baseline * (1 + this); e.g. 0.05 = 5% worse."))
    max_absolute_drop: float | None = Field(None, gt=0, description=(
        "Budget of a score metric: at most baseline - this."))

    @model_validator(mode="after")
    def _budget_fits_metric(self) -> SuiteConfig:
        if self.metric in LOSS_METRICS and self.max_absolute_drop is not None:
            raise ValueError(f"max_absolute_drop: suite {self.name!r} has a loss metric; use max_relative_increase")
        if self.metric in SCORE_METRICS and self.max_relative_increase is not None:
            raise ValueError(f"max_relative_increase: suite {self.name!r} has a score metric; use max_absolute_drop")
        return self


class MonitorConfig(Strict):
    """The forgetting monitor: retention suites evaluated from step 0, a budget, and what to do on a breach."""

    suites: list[SuiteConfig] = Field(default_factory=list, description="Retention suites of old skills.")
    eval_at: list[int] = Field(default_factory=lambda: [0, 5, 10, 25, 50], description=(
        "Steps evaluated besides every training.eval_steps and the end: dense early, where forgetting happens first."))
    policy: Literal["report", "stop", "rollback"] = Field("report", description=(
        "On a budget breach: report (carry on; exit code 3 if the final model is out of budget), stop (end the "
        "run; final/ = the last evaluated checkpoint within budget), rollback (carry on; final/ = the best "
        "checkpoint within every budget by new-task loss)."))
    early_stopping_patience: int = Field(0, ge=0, description=(
        "Stop after this many evaluations without new-task improvement; 0 = off."))
    early_stopping_min_delta: float = Field(0.0, ge=0, description=(
        "Smallest new-task loss decrease that counts as improvement."))
    kl_to_base: bool = Field(False, description=(
        "Log kl_to_base at every evaluation: KL(base || current) per target token of data.eval_files, on the "
        "base's top kl_top_k tokens (distrib_ft/monitor/drift.py); a forgetting signal that needs no old data."))
    kl_top_k: int = Field(32, ge=1, description="Tokens of the base's distribution kept per position for kl_to_base.")
    max_kl_to_base: float | None = Field(None, gt=0, description=(
        "A budget on kl_to_base (nats per token), judged like a retention suite's; none = measured only."))


# A union built from the registry at import time: `X | Y` cannot spell a union over a computed tuple.
MethodConfig = Annotated[Union[tuple(cls.config_class for cls in METHODS.values())], Field(discriminator="type")]  # noqa: UP007


class _JobSections(Strict):
    """The sections every job has; the defences' sections are added from their registry below."""

    model: ModelConfig
    method: MethodConfig = Field(default_factory=METHODS[DEFAULT].config_class, description=(
        "The fine-tuning method (distrib_ft/methods/): method.type chooses it; its keys are documented in its file."))
    data: DataConfig
    training: TrainingConfig
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    source: str | None = Field(None, description="(set by the loader) the job file this came from.")

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("method"), dict) and "type" not in raw["method"]:
            raw = {**raw, "method": {**raw["method"], "type": DEFAULT}}
        return raw

    @model_validator(mode="after")
    def _cross_checks(self) -> _JobSections:
        if self.data.streaming and self.training.max_steps <= 0:
            raise ValueError("training.max_steps: required with data.streaming=true (a stream has no known length)")
        names = [su.name for su in self.monitor.suites]
        if len(set(names)) != len(names) or {"new_task", "kl_to_base"} & set(names):
            raise ValueError("monitor.suites: names must be unique and not 'new_task' or 'kl_to_base'")
        if self.monitor.kl_to_base and not self.data.eval_files:
            raise ValueError("monitor.kl_to_base: needs data.eval_files (the KL is measured on the new task's "
                             "eval set)")
        if self.monitor.max_kl_to_base is not None and not self.monitor.kl_to_base:
            raise ValueError("monitor.max_kl_to_base: set monitor.kl_to_base: true to measure it")
        if self.monitor.early_stopping_patience and not self.data.eval_files:
            raise ValueError("monitor.early_stopping_patience: needs data.eval_files (the new task's held-out set)")
        if self.data.packing and self.data.format == "tokenized":
            raise ValueError("data.packing: not supported with data.format=tokenized (records are used as they are)")
        for defence in DEFENCES:  # each defence's cross-checks live in its own file
            section = getattr(self, defence.name)
            if section.enabled and hasattr(section, "check_job"):
                section.check_job(self)
        return self


JobConfig = create_model(
    "JobConfig", __base__=_JobSections, __module__=__name__,
    __doc__="A whole job: the common sections and one section per defence (distrib_ft/preservation/).",
    **{d.name: (d.config_class, Field(default_factory=d.config_class, description=d.config_class.__doc__))
       for d in DEFENCES})

# Keys that moved or were renamed: the old spelling is an error that names the new one.
MOVED = {
    "data.token_masking": "token_masking (a section of its own)",
    "replay.generate": "generative_replay (a section of its own; add buffer: the replay buffer to write into)",
    "ewc.fisher_file": "ewc.fisher_path",
    "ewc.fisher_files": "ewc.fisher_data_files",
    "ewc.fisher_format": "ewc.fisher_data_format",
    "ewc.update_fisher_after": "ewc.update_after",
}


def _check_moved(raw: dict, source: str) -> None:
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{source}: {old}: this key is now {new}")


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: override {dotted}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """Parse ``section.key=value`` strings; the value is read as YAML."""
    out = []
    for p in pairs:
        if "=" not in p or p.startswith("="):
            raise ConfigError(f"override {p!r}: expected section.key=value")
        key, val = p.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(val) if val != "" else ""))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {p!r}: value is not valid YAML ({e.problem})") from None
    return out


def _section_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The config class under ``root`` that holds the last key of ``loc`` (a pydantic error location), or None."""
    cls, parts = root, [p for p in loc[:-1] if not isinstance(p, int)]
    while parts and cls is not None:
        part = parts.pop(0)
        if part == "method" and parts and parts[0] in METHODS:
            cls = METHODS[parts.pop(0)].config_class
            continue
        field = next((f for n, f in cls.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        cls = section_class(field.annotation)
    return cls


def _unknown_key(loc: tuple, root: type[BaseModel]) -> str:
    """What to say of an unknown key: the close spelling, or which method has it."""
    key, cls = str(loc[-1]), _section_at(loc, root)
    if cls is None:
        return "unknown key (check the spelling)"
    known = [f.alias or n for n, f in cls.model_fields.items() if n != "source"]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    if loc[:1] == ("method",) and len(loc) > 2:
        owners = [name for name, m in METHODS.items() if key in m.config_class.model_fields]
        if owners:
            return f"not a key of method.type {loc[1]} (it is one of {', '.join(owners)}'s)"
    return f"unknown key; the keys here are {', '.join(known)}"


def format_validation(err: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """One line for a pydantic error of a file ``source`` validated as ``root`` (default: JobConfig).

    ``source: key.path: what is wrong; other.key: ...``; an unknown key names its close spelling or the keys there.
    """
    root = root or JobConfig
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        if loc[:1] == ["method"] and len(loc) > 1 and loc[1] in METHODS:  # the union's tag is not a key
            del loc[1]
        key = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(tuple(e["loc"]), root)
        elif e["type"] == "union_tag_invalid":
            key, msg = f"{key}.type", f"{e['input'].get('type')!r} is not a method; known: {', '.join(METHODS)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {key}: {msg}" if loc else f"{source}: {msg}")
    return "; ".join(lines).replace(f"; {source}: ", "; ")


def read_yaml_mapping(path: str | os.PathLike, what: str = "job file", top: str = "sections") -> dict:
    """A YAML file's top-level mapping (duplicate keys refused).

    Raises ConfigError with a one-line message naming the file (and the line of a YAML error): ``<what> not found``,
    not valid YAML, a duplicate key, a top level that is not a mapping (of ``top``).
    """
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"{source}: {what} not found")
    try:
        raw = load_yaml_unique(Path(path).read_text()) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of {top}")
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a job file. Raises ConfigError with a one-line message."""
    source = str(path)
    raw = read_yaml_mapping(path)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value, source)
    return config_from_dict(raw, source)


def config_from_dict(raw: dict, source: str = "<config>") -> JobConfig:
    """Validate a job given as a dict (the YAML's content). Raises ConfigError with a one-line message."""
    _check_moved(raw, source)
    try:
        cfg = JobConfig.model_validate({**raw, "source": source})
    except ValidationError as e:
        raise ConfigError(format_validation(e, source)) from None
    return cfg


def dump_config(cfg: JobConfig) -> str:
    """The validated job as YAML: JSON-mode values, keys by their aliases, in declaration order."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
