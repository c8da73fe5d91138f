"""The job config: one YAML file per job, validated strictly before any worker starts.

Sections mirror the layout of a job: ``model``, ``method``, ``data``, ``training`` (Hugging Face
``TrainingArguments`` names), ``distributed``. Every model forbids unknown keys, so a typo is an
error that names the dotted key and the file. ``section.key=value`` overrides are applied to the
raw YAML before validation; values are parsed as YAML (``training.bf16=false``,
``method.target_modules=[q_proj,v_proj]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A job config that cannot run; the message is one line naming the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name_or_path: str = Field(description="Local Hugging Face causal-LM folder or hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights are loaded in; DeepSpeed bf16 casts as needed.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto = flash_attention_2 when flash-attn is installed and CUDA is used, else sdpa.")
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained.")


class MethodConfig(_Strict):
    type: Literal["full", "lora"] = Field("lora", description="full fine-tuning or a peft LoRA adapter.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (alpha = 2r is a good default).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Modules that get adapters: attention and MLP projections, or 'all-linear'.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    merge_adapters: list[str] = Field(default_factory=list, description=(
        "LoRA adapters of earlier rounds (their final/ folders), merged into the base weights in this order "
        "before the new adapter is added; the retraining chain of EWC-LoRA (ewc.target: lora_merged)."))


class TokenMaskingConfig(_Strict):
    """Selective Token Masking (Wu et al. 2025): drop from the loss the response tokens the base model finds
    surprising, which are the ones that pull it furthest from what it knows."""

    mode: Literal["off", "stm", "random"] = Field("off", description=(
        "stm: mask target tokens whose base-model perplexity exp(NLL) exceeds threshold; random: mask the same "
        "number of target tokens chosen at random (the control); off."))
    threshold: float = Field(2.5, gt=1, description="tau: the perplexity above which a token is masked (2.5 in the paper).")
    batch_size: int = Field(8, ge=1, description="Sequences per forward in the base-model pass.")


class DataConfig(_Strict):
    train_files: list[str] = Field(description="JSONL / Parquet files or saved `datasets` directories.")
    eval_files: list[str] = Field(default_factory=list, description="Held-out files of the new task.")
    format: Literal["alpaca", "chat", "text", "tokenized"] = Field(
        "alpaca", description="alpaca (instruction, input, output), chat (messages), text, tokenized (input_ids[, labels]).")
    max_seq_length: int = Field(512, ge=8, description="Longer sequences are truncated (and counted in the log).")
    packing: bool = Field(False, description="Concatenate examples into max_seq_length blocks.")
    prompt_template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="How alpaca records are rendered: the model's chat template (auto when it has one) or the Alpaca prompt.")
    streaming: bool = Field(False, description="Stream the files instead of preparing them in memory (large data).")
    text_field: str = Field("text", description="Field holding the text for format=text.")
    token_masking: TokenMaskingConfig = Field(default_factory=TokenMaskingConfig, description=(
        "Selective Token Masking of the new data's responses (a base-model pass before training, cached)."))

    @model_validator(mode="after")
    def _files_given(self) -> "DataConfig":
        if not self.train_files:
            raise ValueError("data.train_files is empty: list at least one file")
        return self


class TrainingConfig(_Strict):
    output_dir: str = Field(description="Everything the job writes goes here.")
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
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps and at the end; 0 = no checkpoints (final/ only).")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (newest).")
    eval_steps: int = Field(0, ge=0, description="Evaluate on data.eval_files every N steps; 0 = only at the end.")
    seed: int = Field(42, description="Seeds model init, dropout and the data order.")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list, description=(
        "Loggers beside metrics.jsonl, with the same names: tensorboard (output_dir/runs) and mlflow "
        "(MLFLOW_TRACKING_URI, else a local file store in output_dir/mlruns)."))


class DistributedConfig(_Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU, or CPU slots).")
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto = GPUs when the Ray cluster has them.")
    cpus_per_worker: int = Field(1, ge=1, description="CPU cores (and OMP threads) per worker.")
    deepspeed: str = Field("ds_configs/zero2.json", description="DeepSpeed JSON; relative paths resolve against the job file, then the project.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl with GPUs, else gloo.")


class EWCConfig(_Strict):
    """Elastic Weight Consolidation: lambda/2 * sum_i F_i (theta_i - theta*_i)^2 (see distrib_ft/preservation/fisher.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    lambda_: float = Field(0.0, alias="lambda", ge=0, description=(
        "Penalty weight; 0 = no penalty. It does not transfer between estimators (their scales differ ~100x)."))
    estimator: Literal["empirical", "sampled", "batched"] = Field(
        "empirical", description="empirical (per-sequence, data labels), sampled (true Fisher), batched (biased; comparison only).")
    target: Literal["trainable", "lora_merged"] = Field("trainable", description=(
        "trainable: F over the parameters being trained, anchored at their start values (full / partial "
        "fine-tuning, or EWC on the adapter itself). lora_merged: F over the dense weights that the LoRA "
        "adapters update, penalty on this round's merged update B@A*scale (EWC-LoRA); the anchor is the "
        "merged model this round starts from."))
    fisher_file: str | None = Field(None, description="A precomputed Fisher (distrib-ft fisher, or final/fisher.safetensors of a round).")
    fisher_files: list[str] = Field(default_factory=list, description="Data of the skills to keep, to compute F at the start of the job.")
    fisher_format: Literal["alpaca", "chat", "text", "tokenized"] | None = Field(
        None, description="Format of fisher_files; default data.format.")
    fisher_max_sequences: int = Field(512, ge=1, description="At most this many sequences enter a Fisher pass.")
    fisher_batch_size: int = Field(8, ge=1, description="Sequences per backward for the sampled and batched estimators.")
    update_fisher_after: bool = Field(False, description=(
        "At the end, compute F on the data just learned and write final/fisher.safetensors (merged online "
        "with the starting F: F <- gamma*F_old + F_new) for the next round."))
    gamma: float = Field(1.0, ge=0, le=1, description="Online EWC decay of the previous rounds' Fisher.")

    @property
    def enabled(self) -> bool:
        return self.lambda_ > 0 or self.update_fisher_after


class GenerateConfig(_Strict):
    """Generative replay: the base model writes pseudo-examples of what it can do before training."""

    prompts_files: list[str] = Field(default_factory=list, description=(
        "Prompts the base model answers (alpaca records' instruction/input, chat records' turns up to the last "
        "user message, or text records), one pseudo-example each."))
    prompts_format: Literal["alpaca", "chat", "text"] = Field("alpaca", description="Format of prompts_files.")
    seed_files: list[str] = Field(default_factory=list, description=(
        "Self-instruct: a few example tasks (alpaca or chat records); the model writes new instructions in "
        "their style, then answers them. Used when prompts_files is empty."))
    num_examples: int = Field(200, ge=1, description="Valid pseudo-examples to produce (more are drawn to replace rejected ones).")
    max_new_tokens: int = Field(128, ge=1, description="Longest response; a response cut here is rejected (length).")
    keep_unfinished: bool = Field(False, description="Keep responses cut at max_new_tokens instead of rejecting them.")
    min_response_chars: int = Field(8, ge=1, description="Shorter responses are rejected (empty / too short).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call on each worker.")
    max_rounds: int = Field(8, ge=1, description="Rounds of generation before giving up on reaching num_examples.")


class ReplayConfig(_Strict):
    """Old examples streamed beside the new data at an exact ratio of every global batch."""

    buffer: str | None = Field(None, description="The replay buffer (distrib-ft replay build): a folder or fsspec URL.")
    version: int | None = Field(None, description="Buffer version to read; default the newest.")
    ratio: float = Field(0.0, ge=0, lt=1, description=(
        "Share of every global batch that is replayed: 0.25 with a global batch of 16 = 4 old sequences per "
        "step. When ratio x global batch is not whole, the count per step alternates so the running ratio is exact."))
    prefetch: int = Field(256, ge=1, description="Replay examples each worker reads and tokenizes ahead.")
    generate: GenerateConfig | None = Field(None, description=(
        "Generative replay: before training, the base model writes pseudo-examples into the buffer as a new "
        "version with its own source (once; a resumed job reuses them)."))
    update_after: bool = Field(False, description=(
        "Carry forward: after the job, add a sample of data.train_files to the buffer as a new version."))
    update_budget: int | None = Field(None, ge=1, description=(
        "Records of the new data added by update_after; default 10% of data.train_files' records, at least 1."))


LOSS_METRICS = ("nll",)
SCORE_METRICS = ("exact_match", "contains", "regex", "multiple_choice")


class SuiteConfig(_Strict):
    """A held-out set of an old skill, measured from step 0 with a budget on how much it may degrade."""

    name: str = Field(description="Shown in metrics.jsonl (retention/<name>), the report and the plots.")
    files: list[str] = Field(description="Data files of the skill (any data format).")
    format: Literal["alpaca", "chat", "text", "tokenized"] = Field("alpaca", description="Format of files.")
    metric: Literal["nll", "exact_match", "contains", "regex", "multiple_choice"] = Field(
        "nll", description="nll: mean token NLL (lower is better); the others score greedy generations (higher is better).")
    pattern: str | None = Field(None, description="metric=regex: the pattern (default: the reference).")
    max_examples: int = Field(256, ge=1, description="At most this many examples are evaluated.")
    max_new_tokens: int = Field(32, ge=1, description="Generation length for the generation metrics.")
    max_relative_increase: float | None = Field(None, gt=0, description=(
        "Budget of a loss metric: at most baseline * (1 + this); e.g. 0.05 = 5% worse."))
    max_absolute_drop: float | None = Field(None, gt=0, description="Budget of a score metric: at most baseline - this.")

    @model_validator(mode="after")
    def _budget_fits_metric(self) -> "SuiteConfig":
        if self.metric in LOSS_METRICS and self.max_absolute_drop is not None:
            raise ValueError(f"max_absolute_drop: suite {self.name!r} has a loss metric; use max_relative_increase")
        if self.metric in SCORE_METRICS and self.max_relative_increase is not None:
            raise ValueError(f"max_relative_increase: suite {self.name!r} has a score metric; use max_absolute_drop")
        return self


class MonitorConfig(_Strict):
    """The forgetting monitor: retention suites evaluated from step 0, a budget, and what to do on a breach."""

    suites: list[SuiteConfig] = Field(default_factory=list, description="Retention suites of old skills.")
    eval_at: list[int] = Field(default_factory=lambda: [0, 5, 10, 25, 50], description=(
        "Steps evaluated besides every training.eval_steps and the end: dense early, where forgetting happens first."))
    policy: Literal["report", "stop", "rollback"] = Field("report", description=(
        "On a budget breach: report (carry on; exit code 3 if the final model is out of budget), stop (end the "
        "run; final/ = the last evaluated checkpoint within budget), rollback (carry on; final/ = the best "
        "checkpoint within every budget by new-task loss)."))
    early_stopping_patience: int = Field(0, ge=0, description="Stop after this many evaluations without new-task improvement; 0 = off.")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest new-task loss decrease that counts as improvement.")


class JobConfig(_Strict):
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    training: TrainingConfig
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    ewc: EWCConfig = Field(default_factory=EWCConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    source: str | None = Field(None, description="(set by the loader) the job file this came from.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobConfig":
        if self.data.streaming and self.training.max_steps <= 0:
            raise ValueError("training.max_steps: required with data.streaming=true (a stream has no known length)")
        e = self.ewc
        if e.lambda_ > 0 and not (e.fisher_file or e.fisher_files):
            raise ValueError("ewc.lambda: > 0 needs ewc.fisher_file or ewc.fisher_files (the data of the skills to keep)")
        if e.fisher_file and e.fisher_files:
            raise ValueError("ewc.fisher_file: give either a precomputed fisher_file or fisher_files, not both")
        if e.target == "lora_merged" and (self.method.type != "lora" or self.method.use_dora):
            raise ValueError("ewc.target: lora_merged needs method.type=lora without use_dora")
        if e.target == "trainable" and self.method.type == "lora" and e.fisher_file:
            raise ValueError("ewc.fisher_file: a new LoRA adapter starts from fresh values, so the anchors of an "
                             "earlier round do not apply; use ewc.target=lora_merged with method.merge_adapters")
        if self.method.merge_adapters and self.method.type != "lora":
            raise ValueError("method.merge_adapters: only with method.type=lora (for full fine-tuning, point "
                             "model.name_or_path at the previous round's final/)")
        if e.update_fisher_after and self.data.streaming:
            raise ValueError("ewc.update_fisher_after: not supported with data.streaming (list ewc.fisher_files instead)")
        names = [su.name for su in self.monitor.suites]
        if len(set(names)) != len(names) or "new_task" in names:
            raise ValueError("monitor.suites: names must be unique and not 'new_task'")
        if self.monitor.early_stopping_patience and not self.data.eval_files:
            raise ValueError("monitor.early_stopping_patience: needs data.eval_files (the new task's held-out set)")
        r = self.replay
        if (r.ratio > 0 or r.generate or r.update_after) and not r.buffer:
            raise ValueError("replay.buffer: needed by replay.ratio > 0, replay.generate and replay.update_after "
                             "(a folder or URL; `distrib-ft replay build` makes one)")
        if r.generate and r.version is not None:
            raise ValueError("replay.version: generative replay adds a new version; leave replay.version unset")
        if r.generate and not (r.generate.prompts_files or r.generate.seed_files):
            raise ValueError("replay.generate: give prompts_files (prompts to answer) or seed_files (self-instruct)")
        if self.data.token_masking.mode != "off" and self.data.streaming:
            raise ValueError("data.token_masking: needs map-style data (data.streaming=false): the base-model pass "
                             "runs over the whole training set before training")
        if self.data.packing and self.data.format == "tokenized":
            raise ValueError("data.packing: not supported with data.format=tokenized (records are used as they are)")
        return self


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


def _format_validation(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the docs of this section)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {key}: {msg}")
    return "; ".join(lines)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a job file. Raises ConfigError with a one-line message."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: job file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value, source)
    return config_from_dict(raw, source)


def config_from_dict(raw: dict, source: str = "<config>") -> JobConfig:
    try:
        cfg = JobConfig.model_validate({**raw, "source": source})
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None
    cfg.distributed.deepspeed = str(resolve_path(cfg.distributed.deepspeed, source))
    return cfg


def resolve_path(p: str, source: str) -> Path:
    """Resolve a path from a job file: absolute, relative to the job file, to the cwd, or to the project."""
    cand = Path(p)
    if cand.is_absolute():
        return cand
    bases = []
    if source and not source.startswith("<"):
        bases.append(Path(source).resolve().parent)
    bases += [Path.cwd(), PROJECT_ROOT]
    for b in bases:
        if (b / cand).exists():
            return (b / cand).resolve()
    return (Path.cwd() / cand).resolve()


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
