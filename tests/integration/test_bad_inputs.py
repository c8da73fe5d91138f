"""A fuzzed set of bad inputs through the real CLI (in this process, ``--launcher local``).

Every row builds one bad input from a valid tiny job: a job file (wrong types, unknown keys, impossible
combinations, paths that do not exist, empty lists, bad YAML, bad overrides), a data file (empty, blank lines,
invalid UTF-8, not JSON objects, wrong field types, nothing left to learn, no chat template) or a DeepSpeed JSON
(pinned conflicts, unknown and duplicate keys). Each must end with exit code 2 and exactly one line on stderr,
``distrib-ft: error: ...``, naming the file, the line or record where there is one, and the key or field; no
traceback; and nothing under ``training.output_dir`` changed (half the rows start with an output_dir holding a
file, the other half without one: it must not be created).

``test_accepted_inputs`` holds what looks odd but is valid and must train: CRLF line endings, a UTF-8 byte order
mark, blank lines between records.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from tests.jobs import ROOT, job_dict, set_in

GOOD = {"instruction": "convert 1 km to m", "input": "", "output": "1 km = 1000 m"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@dataclass
class Case:
    """One bad input being built: the job (as a dict, written as YAML unless ``text`` is set) and the CLI args."""

    tmp: Path
    model_dir: Path
    raw: dict
    args: list[str] = field(default_factory=list)
    text: str | None = None  # the job file's text, when it is not the YAML of ``raw``
    job: Path = None  # type: ignore[assignment]

    def file(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p


# ----------------------------------------------------------------------------------------------- builders


def setting(*pairs) -> Callable[[Case], None]:
    """Set dotted keys of the job (``setting("a.b", 1, "c.d", 2)``)."""
    def build(c: Case) -> None:
        for dotted, value in zip(pairs[::2], pairs[1::2]):
            set_in(c.raw, dotted, value)
    return build


def method(section: dict) -> Callable[[Case], None]:
    def build(c: Case) -> None:
        c.raw["method"] = section
    return build


def override(*args: str) -> Callable[[Case], None]:
    def build(c: Case) -> None:
        c.args += list(args)
    return build


def job_text(text: str) -> Callable[[Case], None]:
    def build(c: Case) -> None:
        c.text = text.replace("{good}", yaml.safe_dump(c.raw))
    return build


def lines(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def data(content: bytes, fmt: str | None = None, key: str = "data.train_files", name: str = "bad.jsonl",
         **extra) -> Callable[[Case], None]:
    """The bad data file as the job's ``key`` (a list key, or ``monitor.suites`` for a retention suite)."""
    def build(c: Case) -> None:
        p = c.file(name, content)
        if key == "monitor.suites":
            c.raw["monitor"] = {"suites": [{"name": "old", "files": [str(p)], **({"format": fmt} if fmt else {})}]}
            return
        set_in(c.raw, key, [str(p)])
        if fmt:
            set_in(c.raw, "data.format", fmt)
        for k, v in extra.items():
            set_in(c.raw, k.replace("__", "."), v)
    return build


def ds_json(obj_or_text) -> Callable[[Case], None]:
    def build(c: Case) -> None:
        text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
        set_in(c.raw, "distributed.deepspeed", str(c.file("ds.json", text)))
    return build


def zero2(**changes) -> dict:
    base = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    return {**base, **changes}


def model_copy(c: Case, drop: tuple[str, ...] = (), keep: tuple[str, ...] | None = None) -> Path:
    """A copy of the tiny model folder without the files in ``drop`` (or with only those in ``keep``)."""
    dst = c.tmp / "model"
    shutil.copytree(c.model_dir, dst)
    for p in dst.iterdir():
        if p.name in drop or (keep is not None and p.name not in keep):
            p.unlink()
    c.raw["model"]["name_or_path"] = str(dst)
    return dst


def no_chat_template(fmt: str, **extra) -> Callable[[Case], None]:
    """The tiny model's tokenizer with its chat template removed; data of format ``fmt``."""
    def build(c: Case) -> None:
        dst = model_copy(c, drop=("chat_template.jinja",))
        cfg_file = dst / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("chat_template", None)
        cfg_file.write_text(json.dumps(cfg))
        p = c.file("bad.jsonl", lines(CHAT if fmt == "chat" else GOOD))
        set_in(c.raw, "data.train_files", [str(p)])
        set_in(c.raw, "data.format", fmt)
        for k, v in extra.items():
            set_in(c.raw, k.replace("__", "."), v)
    return build


def long_prompts(c: Case) -> None:
    """Every record's prompt alone is longer than max_seq_length: no target token is left in any of them."""
    rec = {"instruction": " ".join(["word"] * 200), "input": "", "output": "ok"}
    set_in(c.raw, "data.train_files", [str(c.file("bad.jsonl", lines(*[rec] * 8)))])


def suite(**kw) -> Callable[[Case], None]:
    def build(c: Case) -> None:
        c.raw["monitor"] = {"suites": [{"name": "old", "files": [str(c.tmp / "train.jsonl")], **kw}]}
    return build


def two_suites(c: Case) -> None:
    s = {"name": "old", "files": [str(c.tmp / "train.jsonl")]}
    c.raw["monitor"] = {"suites": [s, dict(s)]}


def missing_job_file(c: Case) -> None:
    c.job = c.tmp / "no-such-job.yaml"


def dir_not_a_dataset(c: Case) -> None:
    d = c.tmp / "notdata"
    d.mkdir()
    (d / "readme.txt").write_text("hello")
    set_in(c.raw, "data.train_files", [str(d)])


def empty_model_dir(c: Case) -> None:
    d = c.tmp / "model"
    d.mkdir()
    c.raw["model"]["name_or_path"] = str(d)


def model_without_tokenizer(c: Case) -> None:
    model_copy(c, keep=("config.json", "model.safetensors", "generation_config.json"))


def broken_model_config(c: Case) -> None:
    dst = model_copy(c)
    (dst / "config.json").write_text("{not json")


def model_type_unknown(c: Case) -> None:
    dst = model_copy(c)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "model_type": "nope"}))


def unfinished_run(c: Case) -> None:
    """output_dir holds a complete checkpoint of another run: a fresh run is refused (before anything is written)."""
    from distrib_ft.runtime.checkpoint import COMPLETE

    step = c.tmp / "out" / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / "job.json").write_text("{}")
    (step / COMPLETE).write_text("")


def output_dir_is_a_file(c: Case) -> None:
    c.tmp.joinpath("out").mkdir(exist_ok=True)
    c.tmp.joinpath("out", "notes.txt").write_text("a file of the user's\n")
    set_in(c.raw, "training.output_dir", str(c.tmp / "out" / "notes.txt"))


# ------------------------------------------------------------------------------------------------ the table
# (id, build, parts the error line must contain). In parts, {job} is the job file and {tmp} the test's folder.

ROWS: list[tuple[str, Callable[[Case], None], tuple[str, ...]]] = [
    # --- config: wrong types
    ("max_steps-string", setting("training.max_steps", "ten"), ("{job}", "training.max_steps", "'ten'")),
    ("batch-size-negative", setting("training.per_device_train_batch_size", -4),
     ("{job}", "training.per_device_train_batch_size", "-4")),
    ("learning-rate-string", setting("training.learning_rate", "fast"), ("{job}", "training.learning_rate")),
    ("bf16-maybe-in-yaml", setting("training.bf16", "maybe"), ("{job}", "training.bf16", "'maybe'")),
    ("train_files-a-string", setting("data.train_files", "train.jsonl"), ("{job}", "data.train_files")),
    ("lora-r-fractional", setting("method.r", 2.5), ("{job}", "method.r", "2.5")),
    ("output_dir-a-number", setting("training.output_dir", 5), ("{job}", "training.output_dir")),
    ("max_seq_length-too-small", setting("data.max_seq_length", 4), ("{job}", "data.max_seq_length")),
    ("format-unknown", setting("data.format", "csv"), ("{job}", "data.format", "'csv'")),
    ("section-a-scalar", setting("training", 5), ("{job}", "training")),
    ("top-level-a-list", job_text("- model\n- data\n"), ("{job}", "top level")),
    ("scheduler-unknown", setting("training.lr_scheduler_type", "step"), ("{job}", "training.lr_scheduler_type")),
    ("suite-metric-unknown", suite(metric="accuracy"), ("{job}", "monitor.suites[0].metric", "'accuracy'")),
    ("model-a-string", setting("model", "tiny"), ("{job}", "model")),
    ("monitor-null", setting("monitor", None), ("{job}", "monitor")),
    ("num_workers-zero", setting("distributed.num_workers", 0), ("{job}", "distributed.num_workers")),
    ("suite-files-a-number", suite(files=3), ("{job}", "monitor.suites[0].files")),
    # --- config: unknown keys, old names
    ("unknown-top-level-key", setting("trainer", {"lr": 1}), ("{job}", "trainer", "unknown key")),
    ("unknown-nested-key", setting("training.learning_rat", 1), ("{job}", "training.learning_rat", "unknown key")),
    ("unknown-key-in-a-suite", suite(budget=0.1), ("{job}", "monitor.suites[0].budget", "unknown key")),
    ("method-type-unknown", method({"type": "qlroa"}), ("{job}", "method.type", "'qlroa'")),
    ("key-of-another-method", method({"type": "full", "r": 8}),
     ("{job}", "method.r", "not a key of method.type full (it is one of lora, qlora's)")),
    ("renamed-ewc.fisher_file", setting("ewc.fisher_file", "f.safetensors"), ("{job}", "ewc.fisher_file",
                                                                               "ewc.fisher_path")),
    ("renamed-data.token_masking", setting("data.token_masking", {"mode": "stm"}),
     ("{job}", "data.token_masking", "token_masking")),
    # --- config: impossible combinations
    ("replay-ratio-1.5", setting("replay.ratio", 1.5), ("{job}", "replay.ratio", "1.5")),
    ("replay-without-buffer", setting("replay.ratio", 0.25), ("{job}", "replay.buffer")),
    ("ewc-lambda-without-data", setting("ewc.lambda", 1.0), ("{job}", "ewc.lambda")),
    ("ewc-path-and-data", setting("ewc.lambda", 1.0, "ewc.fisher_path", "{tmp}/train.jsonl",
                                  "ewc.fisher_data_files", ["{tmp}/train.jsonl"]), ("{job}", "ewc.fisher_path")),
    ("ewc-lora_merged-with-full", setting("method.type", "full", "ewc.lambda", 1.0, "ewc.target", "lora_merged",
                                          "ewc.fisher_data_files", ["{tmp}/train.jsonl"]), ("{job}", "ewc.target")),
    ("streaming-without-max_steps", setting("data.streaming", True, "training.max_steps", -1),
     ("{job}", "training.max_steps", "streaming")),
    ("packing-with-tokenized", setting("data.packing", True, "data.format", "tokenized"), ("{job}", "data.packing")),
    ("token_masking-with-streaming", setting("token_masking.mode", "stm", "data.streaming", True),
     ("{job}", "token_masking")),
    ("suites-duplicate-name", two_suites, ("{job}", "monitor.suites", "unique")),
    ("suite-max_absolute_drop-on-nll", suite(metric="nll", max_absolute_drop=0.1),
     ("{job}", "monitor.suites[0]", "max_absolute_drop")),
    ("early-stopping-without-eval", setting("monitor.early_stopping_patience", 2),
     ("{job}", "monitor.early_stopping_patience")),
    ("generative-replay-without-prompts", setting("generative_replay.buffer", "{tmp}/buf"),
     ("{job}", "generative_replay")),
    ("target_modules-match-nothing", setting("method.target_modules", ["q_proj", "nope_proj"]),
     ("{job}", "method.target_modules", "'nope_proj'")),
    ("dora-under-zero3", setting("method.use_dora", True, "distributed.deepspeed", str(ROOT / "ds_configs/zero3.json")),
     ("{job}", "method.use_dora")),
    # --- config: paths that do not exist
    ("train-file-missing", setting("data.train_files", ["{tmp}/nope.jsonl"]),
     ("{job}", "data.train_files[0]", "nope.jsonl", "not found")),
    ("eval-file-missing", setting("data.eval_files", ["{tmp}/train.jsonl", "{tmp}/nope.jsonl"]),
     ("{job}", "data.eval_files[1]", "nope.jsonl")),
    ("deepspeed-json-missing", setting("distributed.deepspeed", "{tmp}/missing.json"),
     ("{job}", "distributed.deepspeed", "missing.json")),
    ("model-folder-missing", setting("model.name_or_path", "{tmp}/no-model"), ("{job}", "model.name_or_path")),
    ("model-folder-empty", empty_model_dir, ("{job}", "model.name_or_path", "config.json")),
    ("fisher_path-missing", setting("method.type", "full", "ewc.lambda", 1.0, "ewc.fisher_path", "{tmp}/F.safetensors"),
     ("{job}", "ewc.fisher_path", "F.safetensors")),
    ("merge_adapters-missing", setting("method.merge_adapters", ["{tmp}/round1/final"]),
     ("{job}", "method.merge_adapters[0]")),
    ("suite-file-missing", suite(files=["{tmp}/old.jsonl"]), ("{job}", "monitor.suites[0].files[0]", "old.jsonl")),
    ("job-file-missing", missing_job_file, ("{tmp}/no-such-job.yaml", "not found")),
    ("output_dir-is-a-file", output_dir_is_a_file,
     ("{job}", "training.output_dir", "notes.txt")),
    ("output_dir-holds-an-unfinished-run", unfinished_run, ("{job}", "training.output_dir", "checkpoints")),
    # --- config: empty lists
    ("train_files-empty", setting("data.train_files", []), ("{job}", "data.train_files", "empty")),
    ("suite-files-empty", suite(files=[]), ("{job}", "monitor.suites[0].files")),
    ("target_modules-empty", setting("method.target_modules", []), ("{job}", "method.target_modules")),
    ("ewc-fisher_data_files-empty", setting("ewc.lambda", 0.5, "ewc.fisher_data_files", []), ("{job}", "ewc.lambda")),
    # --- the job file's YAML and the command line
    ("duplicate-yaml-key", job_text("{good}training:\n  max_steps: 3\n"),
     ("{job}", "line", "duplicate key 'training'")),
    ("yaml-syntax-error", job_text("model: {name_or_path: [\n"), ("{job}", "line", "not valid YAML")),
    ("job-file-empty", job_text(""), ("{job}", "model", "missing")),
    ("override-bf16-maybe", override("training.bf16=maybe"), ("{job}", "training.bf16", "'maybe'")),
    ("override-unknown-key", override("training.seeed=1"), ("{job}", "training.seeed", "unknown key")),
    ("override-without-value", override("training.bf16"), ("training.bf16", "section.key=value")),
    ("override-into-a-value", override("training.max_steps.x=1"), ("{job}", "training.max_steps.x")),
    ("override-bad-yaml", override("data.train_files=[a"), ("data.train_files=[a", "YAML")),
    # --- data
    ("jsonl-empty", data(b""), ("{tmp}/bad.jsonl", "no records")),
    ("jsonl-only-blank-lines", data(b"\n  \n\r\n\n"), ("{tmp}/bad.jsonl", "no records")),
    ("invalid-utf8-line-3", data(lines(GOOD, GOOD, b'{"instruction": "a\xff\xfeb", "output": "x"}')),
     ("{tmp}/bad.jsonl", "line 3", "UTF-8")),
    ("json-array-line-2", data(lines(GOOD, [GOOD])), ("{tmp}/bad.jsonl", "line 2", "JSON object")),
    ("invalid-json-line-2", data(lines(GOOD, b'{"instruction": "a", "output": ')), ("{tmp}/bad.jsonl", "line 2")),
    ("output-a-number", data(lines(GOOD, {"instruction": "a", "output": 5})),
     ("{tmp}/bad.jsonl", "line 2", "'output'")),
    ("instruction-missing", data(lines({"output": "x"})), ("{tmp}/bad.jsonl", "line 1", "'instruction'", "missing")),
    ("messages-not-a-list", data(lines(CHAT, {"messages": "hi"}), "chat"), ("{tmp}/bad.jsonl", "line 2", "'messages'")),
    ("role-unknown", data(lines({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}),
                          "chat"), ("{tmp}/bad.jsonl", "line 1", "messages[1].role", "'bot'")),
    ("content-a-list", data(lines({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant",
                                                                                     "content": "x"}]}), "chat"),
     ("{tmp}/bad.jsonl", "line 1", "messages[0].content")),
    ("chat-without-assistant", data(lines({"messages": [{"role": "user", "content": "hi"}]}), "chat"),
     ("{tmp}/bad.jsonl", "line 1", "'messages'", "assistant")),
    ("text-field-missing", data(lines({"body": "hello"}), "text"), ("{tmp}/bad.jsonl", "line 1", "'text'")),
    ("input_ids-out-of-vocab", data(lines({"input_ids": [1, 2, 99999]}), "tokenized"),
     ("{tmp}/bad.jsonl", "line 1", "input_ids[2]")),
    ("labels-length-mismatch", data(lines({"input_ids": [1, 2, 3], "labels": [1, 2]}), "tokenized"),
     ("{tmp}/bad.jsonl", "line 1", "'labels'")),
    ("input_ids-strings", data(lines({"input_ids": ["a", "b"]}), "tokenized"),
     ("{tmp}/bad.jsonl", "line 1", "input_ids[0]")),
    ("no-target-left-after-truncation", long_prompts, ("{tmp}/bad.jsonl", "data.train_files", "no target")),
    ("chat-without-chat-template", no_chat_template("chat"), ("{tmp}/bad.jsonl", "data.train_files", "chat template")),
    ("alpaca-chat-prompt-without-template", no_chat_template("alpaca", data__prompt_template="chat"),
     ("{tmp}/bad.jsonl", "data.train_files", "chat template")),
    ("directory-not-a-dataset", dir_not_a_dataset, ("{tmp}/notdata", "saved dataset")),
    ("unsupported-extension", data(lines(GOOD), name="bad.csv"), ("{tmp}/bad.csv", "unsupported file type")),
    ("parquet-not-parquet", data(b"this is not parquet", name="bad.parquet"), ("{tmp}/bad.parquet", "Parquet")),
    ("eval-file-bad-record", data(lines(GOOD, {"instruction": 3, "output": "x"}), key="data.eval_files"),
     ("{tmp}/bad.jsonl", "line 2", "'instruction'")),
    ("suite-file-bad-record", data(lines({"instruction": "a"}), key="monitor.suites"),
     ("{tmp}/bad.jsonl", "line 1", "'output'")),
    ("model-without-tokenizer", model_without_tokenizer, ("{job}", "model.name_or_path", "tokenizer")),
    ("model-config-not-json", broken_model_config, ("{job}", "model.name_or_path", "config.json")),
    ("model-type-unknown", model_type_unknown, ("{job}", "model.name_or_path", "config.json", "nope")),
    ("ewc-data-bad-record", data(lines(GOOD, {"instruction": "a", "output": ["x"]}), key="ewc.fisher_data_files",
                                 ewc__lambda=1.0), ("{tmp}/bad.jsonl", "line 2", "'output'")),
    # --- DeepSpeed JSON
    ("ds-pins-micro-batch", ds_json(zero2(train_micro_batch_size_per_gpu=16)),
     ("{tmp}/ds.json", "train_micro_batch_size_per_gpu", "16")),
    ("ds-pins-gradient-clipping", ds_json(zero2(gradient_clipping=0.5)), ("{tmp}/ds.json", "gradient_clipping")),
    ("ds-pins-bf16", ds_json(zero2(bf16={"enabled": True})), ("{tmp}/ds.json", "bf16.enabled")),
    ("ds-pins-optimizer-lr", ds_json(zero2(optimizer={"type": "AdamW", "params": {"lr": 0.1}})),
     ("{tmp}/ds.json", "optimizer.params.lr")),
    ("ds-unknown-top-level-key", ds_json(zero2(zero_optimisation={"stage": 2})),
     ("{tmp}/ds.json", "'zero_optimisation'")),
    ("ds-duplicate-key", ds_json('{"zero_optimization": {"stage": 2}, "zero_optimization": {"stage": 3}}'),
     ("{tmp}/ds.json", "duplicate key 'zero_optimization'")),
    ("ds-not-json", ds_json('{"zero_optimization": {"stage": 2},\n}'), ("{tmp}/ds.json", "line 2")),
    ("ds-top-level-a-list", ds_json([{"zero_optimization": {"stage": 2}}]), ("{tmp}/ds.json", "top level")),
    ("ds-zero-stage-5", ds_json(zero2(zero_optimization={"stage": 5})), ("{tmp}/ds.json", "zero_optimization.stage")),
    ("ds-zero-section-a-number", ds_json(zero2(zero_optimization=2)), ("{tmp}/ds.json", "zero_optimization")),
    ("ds-scheduler-section", ds_json(zero2(scheduler={"type": "WarmupLR"})), ("{tmp}/ds.json", "scheduler")),
    ("ds-optimizer-params-a-list", ds_json(zero2(optimizer={"type": "AdamW", "params": [0.1]})),
     ("{tmp}/ds.json", "optimizer.params")),
    ("replay-buffer-missing", setting("replay.ratio", 0.25, "replay.buffer", "{tmp}/no-buffer"),
     ("{job}", "replay", "no-buffer")),
    ("ds-fp16", ds_json(zero2(fp16={"enabled": True})), ("{tmp}/ds.json", "fp16")),
]


def _fill(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


def snapshot(path: Path) -> dict | None:
    """Every file and folder under ``path`` with its size, mtime and content hash; None when it does not exist."""
    if not path.exists():
        return None
    items = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    out = {}
    for p in items:
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(path.parent))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, digest)
    return out


def run_cli(capfd, job: Path, *args: str) -> tuple[int, str, str]:
    code = main(["train", str(job), *args, "--launcher", "local"])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("index", range(len(ROWS)), ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_output_dir_untouched(tmp_path, tiny_model_dir, capfd, index):
    name, build, parts = ROWS[index]
    c = Case(tmp=tmp_path, model_dir=tiny_model_dir, raw=job_dict(tmp_path, tiny_model_dir), job=tmp_path / "job.yaml")
    out = tmp_path / "out"
    if index % 2 == 0:  # half the rows: an output_dir that exists already, with a file in it
        out.mkdir()
        (out / "notes.txt").write_text("a file of the user's\n")
    build(c)
    c.raw = _fill(c.raw, tmp_path)
    if c.job.name == "job.yaml":
        c.job.write_text(c.text if c.text is not None else yaml.safe_dump(c.raw))
    before = snapshot(out)
    capfd.readouterr()

    code, stdout, stderr = run_cli(capfd, c.job, *c.args)

    assert "Traceback" not in stdout + stderr, stderr
    assert code == 2, (code, stderr[-3000:])
    err_lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1, stderr[-3000:]
    line = err_lines[0]
    assert line.startswith("distrib-ft: error: "), line
    for part in parts:
        part = part.replace("{job}", str(c.job)).replace("{tmp}", str(tmp_path))
        assert part in line, (part, line)
    assert snapshot(out) == before, f"{name}: training.output_dir changed"


def test_bad_record_past_the_drivers_look_is_found_by_the_workers(tmp_path, tiny_model_dir, capfd):
    """The driver reads the first 64 records of each file; a bad record after them is found while the workers
    prepare the data, once the run has started: still exit 2, no traceback, the error line is the last line (the
    run's own lines and progress bars come before it, so it is not in the one-line table above), and output_dir is
    written only once the data is ready."""
    raw = job_dict(tmp_path, tiny_model_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(lines(*[GOOD] * 99, {"instruction": "a"}))
    set_in(raw, "data.train_files", [str(bad)])
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a file of the user's\n")
    before = snapshot(out)
    capfd.readouterr()
    code, stdout, stderr = run_cli(capfd, job)
    assert "Traceback" not in stdout + stderr, stderr
    assert code == 2, (code, stderr[-3000:])
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"distrib-ft: error: {bad}: line 100: field 'output': missing"), last
    assert snapshot(out) == before, "training.output_dir changed"


ACCEPTED = [
    ("crlf", lines(GOOD, GOOD, GOOD, GOOD).replace(b"\n", b"\r\n")),
    ("bom", b"\xef\xbb\xbf" + lines(GOOD, GOOD, GOOD, GOOD)),
    ("blank-lines-between-records", b"\n" + b"\n\n  \n".join(json.dumps(GOOD).encode() for _ in range(4)) + b"\n\n"),
]


@pytest.mark.parametrize("content", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_accepted_inputs_train(tmp_path, tiny_model_dir, capfd, content):
    raw = job_dict(tmp_path, tiny_model_dir, max_steps=1)
    data_file = tmp_path / "data.jsonl"
    data_file.write_bytes(content)
    set_in(raw, "data.train_files", [str(data_file)])
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    code, stdout, stderr = run_cli(capfd, job)
    assert code == 0, stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 1
    assert "4 records -> 4 examples" in stdout + stderr
