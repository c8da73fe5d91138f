"""Defences against forgetting: one file each, one line in ``DEFENCES``.

A defence is a class with ``name`` (its section of the job file), ``config_class`` (that section's
pydantic model, declared in the defence's file; its ``enabled`` property says whether the job uses the
defence) and a constructor ``cls(config, ctx)`` taking its own section and a small :class:`Context`.
The loop never names a defence: it calls the hooks below, each optional (a defence defines only the
ones it needs; there is no base class), in this order:

- ``check(*, zero_stage, model, method)``: refuse an unsupported combination at start-up (ValueError
  naming the key);
- ``prepare_train_data(model, dataset)``: the prepared training set before the first step -> the set to
  train on (token masking rewrites labels); map-style data only;
- ``load_state_dict(state)``: on resume, what ``state_dict`` returned when the checkpoint was saved;
- ``on_task_start(model, *, resumed)``: compute or load state (the Fisher and anchors, generated
  examples); state not in the checkpoint is persisted in ``ctx.output_dir`` so a resumed run reuses it;
- ``batch_share``: attribute, the share of every global batch that ``mix`` supplies (replay's ratio);
- ``mix(step, examples)``: this rank's examples of an optimizer step -> the examples to train on
  (replay appends old ones marked ``"replay": True``);
- ``penalty(model, logging)``: an extra loss term for this optimizer step, or None (``logging``: a metrics line
  follows this step, so a defence computes its value then; its gradient may come from a custom backward);
- ``observe(examples, nll, targets)``: after each micro-batch's forward: its examples and their per-sequence
  NLL sums and target counts, shape (B,) (replay splits the loss into new and replayed);
- ``add_to_grads(model, logging)``: after the optimizer step's last backward, before ``engine.step()``: add a
  gradient in place into DeepSpeed's reduced gradient buffers (EWC's lambda F (theta - theta*); the gradient
  norm and clipping see it);
- ``metrics()``: values for the next metrics.jsonl line since the previous call; collective (every rank
  calls it at the same steps, so a defence may all-reduce);
- ``after_step(model, step)``: after each optimizer step (``step``: the steps done), e.g. the EMA's update;
- ``exported_weights(model, *, master=False)``: a context manager in which ``model`` holds the weights the job
  exports (the EMA), the training weights put back on exit; the loop evaluates, exports and runs
  ``on_task_end`` inside it (``master=True`` for export: also the optimizer's fp32 master copy);
- ``state_dict()``: what a checkpoint must hold for an exact resume (small, JSON-able);
- ``tensors()`` / ``load_tensors(tensors)``: tensors a checkpoint must hold (in DeepSpeed's client_state,
  ``"tensors"``), loaded on resume and again when the monitor's rollback loads an older checkpoint;
- ``summary()``: entries for summary.json;
- ``close()``: the loop is over: release threads and files;
- ``on_task_end(model, *, final_dir, train_examples)``: what the next round needs (written into final/,
  or the replay buffer); returns the files written.

Also optional, on the driver before any worker starts: ``preflight(config, job, tokenizer)`` (a staticmethod;
``job``: the resolved JobConfig, ``tokenizer`` None when it cannot be loaded there) checks
inputs that only the defence understands (that a replay buffer version exists, the first records of
its data files).

To add a defence: a file here with its config class and its class, one line in ``DEFENCES``, one row in
``ROWS`` of tests/integration/test_strategies.py (docs/architecture.md walks through a real one).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from distrib_ft.preservation.ema import EMA
from distrib_ft.preservation.ewc import EWC
from distrib_ft.preservation.generative_replay import GenerativeReplay
from distrib_ft.preservation.l2_sp import L2SP
from distrib_ft.preservation.replay import Replay
from distrib_ft.preservation.token_masking import TokenMasking
from distrib_ft.schema import Strict


@dataclass(frozen=True)
class Context:
    """What a defence may know of the job besides its own section.

    Attributes:
        tokenizer: the model's tokenizer (pad token set).
        output_dir: the job's output folder.
        data: the job's ``data`` section (format, max_seq_length, templates, train_files).
        per_rank: examples per rank per optimizer step (micro-batch x accumulation).
        seed: ``training.seed``.
        model_name: the model folder the job starts from.
    """

    tokenizer: Any
    output_dir: Path
    data: Any
    per_rank: int
    seed: int
    model_name: str

    @classmethod
    def of(cls, job_config, tokenizer) -> Context:
        """The context of a (resolved) JobConfig."""
        t = job_config.training
        from distrib_ft.runtime.storage import local  # a URL output_dir: its node-local staging folder

        return cls(tokenizer=tokenizer, output_dir=local(t.output_dir), data=job_config.data,
                   per_rank=t.per_device_train_batch_size * t.gradient_accumulation_steps, seed=t.seed,
                   model_name=job_config.model.name_or_path)


class Defence(Protocol):
    name: ClassVar[str]
    config_class: ClassVar[type[Strict]]

    def __init__(self, config: Strict, ctx: Context) -> None: ...


# Order matters where hooks depend on each other: generative replay fills the buffer that replay reads.
DEFENCES: tuple[type[Defence], ...] = (TokenMasking, EWC, L2SP, GenerativeReplay, Replay, EMA)


def build_defences(job_config, ctx: Context) -> list[Defence]:
    """The defences a job enables (``job_config.<name>.enabled``), in ``DEFENCES`` order."""
    return [cls(getattr(job_config, cls.name), ctx) for cls in DEFENCES if getattr(job_config, cls.name).enabled]


def call(defences: list[Defence], hook: str, *args, **kwargs) -> list:
    """``hook(*args, **kwargs)`` of every defence that has it; their results in order."""
    return [getattr(d, hook)(*args, **kwargs) for d in defences if hasattr(d, hook)]


def chain(defences: list[Defence], hook: str, value, *args):
    """Thread ``value`` through ``hook(*args, value)`` of every defence that has it (mix, prepare_train_data)."""
    for d in defences:
        if hasattr(d, hook):
            value = getattr(d, hook)(*args, value)
    return value


@contextlib.contextmanager
def exported(defences: list[Defence], model, **kwargs):
    """A context in which ``model`` holds the weights the job exports (every ``exported_weights`` entered)."""
    with contextlib.ExitStack() as stack:
        for d in defences:
            if hasattr(d, "exported_weights"):
                stack.enter_context(d.exported_weights(model, **kwargs))
        yield


def load_tensors(defences: list[Defence], client_state: dict) -> None:
    """Give each defence with ``load_tensors`` its tensors from a checkpoint's client_state."""
    for d in defences:
        if hasattr(d, "load_tensors"):
            d.load_tensors(client_state.get("tensors", {}).get(d.name, {}))


def merged(dicts: list[dict]) -> dict:
    """One dict with the keys of all of ``dicts``; on a repeated key the later dict wins."""
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out
