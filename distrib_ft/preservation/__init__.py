"""Defences against forgetting: one contract, one file each.

The training loop calls a strategy through these hooks only, in this order:

- ``check(zero_stage=..., model=...)``: refuse an unsupported combination at start-up (ValueError naming the key);
- ``load_state_dict(state)``: on resume, what ``state_dict`` returned when the checkpoint was saved;
- ``on_task_start(model, output_dir=..., resumed=...)``: compute or load state (e.g. the Fisher and anchors,
  generated replay examples); state that is not in the checkpoint is persisted in output_dir so that a
  resumed run uses the same state;
- ``mix(step, examples)``: this rank's examples of an optimizer step -> the examples to train on
  (replay adds old ones, marked ``"replay": True``);
- ``penalty(model)``: an extra loss term for this optimizer step, or None;
- ``metrics()``: values for the next metrics.jsonl line, accumulated since the previous call (this rank's);
- ``state_dict()``: what a checkpoint must hold for an exact resume (small, JSON-able);
- ``close()``: the loop is over: release threads and files;
- ``on_task_end(model, final_dir=..., train_examples=...)``: compute what the next round needs and write it
  (into final/, or the replay buffer); returns the files written.

Strategies take flat arguments (``from_config`` turns the job's section into them) so that each is
constructible in a unit test. To add one: a file here with the class (``Hooks`` gives the no-op
defaults), one line in ``build_strategies``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class Strategy(Protocol):
    name: str

    def check(self, *, zero_stage: int, model: torch.nn.Module) -> None: ...

    def load_state_dict(self, state: dict) -> None: ...

    def on_task_start(self, model: torch.nn.Module, *, output_dir: Path, resumed: bool) -> None: ...

    def mix(self, step: int, examples: list[dict]) -> list[dict]: ...

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None: ...

    def metrics(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def close(self) -> None: ...

    def on_task_end(self, model: torch.nn.Module, *, final_dir: Path, train_examples) -> list[Path]: ...


class Hooks:
    """No-op defaults of every hook; a strategy overrides the ones it needs."""

    name = "hooks"

    def check(self, *, zero_stage: int, model: torch.nn.Module) -> None:
        return None

    def load_state_dict(self, state: dict) -> None:
        return None

    def on_task_start(self, model: torch.nn.Module, *, output_dir: Path, resumed: bool) -> None:
        return None

    def mix(self, step: int, examples: list[dict]) -> list[dict]:
        return examples

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def close(self) -> None:
        return None

    def on_task_end(self, model: torch.nn.Module, *, final_dir: Path, train_examples) -> list[Path]:
        return []


def build_strategies(cfg, tokenizer) -> list[Strategy]:
    """The strategies a job enables, from its config sections."""
    strategies: list[Strategy] = []
    if cfg.ewc.enabled:
        from distrib_ft.preservation.ewc import EWC

        strategies.append(EWC.from_config(cfg, tokenizer))
    if cfg.replay.ratio > 0 or cfg.replay.generate or cfg.replay.update_after:
        from distrib_ft.preservation.replay import Replay

        strategies.append(Replay.from_config(cfg, tokenizer))
    return strategies
