"""Defences against forgetting: one contract, one file each.

The training loop calls a strategy through these hooks only, in this order:

- ``check(zero_stage=..., model=...)``: refuse an unsupported combination at start-up (ValueError naming the key);
- ``on_task_start(model, output_dir=..., resumed=...)``: compute or load state (e.g. the Fisher and anchors);
  the state is persisted in output_dir so that a resumed run uses the same state;
- ``penalty(model)``: an extra loss term for this optimizer step, or None;
- ``on_task_end(model, final_dir=..., train_examples=...)``: compute what the next round needs and write it
  into final/; returns the files written.

Strategies take flat arguments (``from_config`` turns the job's section into them) so that each is
constructible in a unit test. To add one: a file here with the class, one line in ``build_strategies``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class Strategy(Protocol):
    name: str

    def check(self, *, zero_stage: int, model: torch.nn.Module) -> None: ...

    def on_task_start(self, model: torch.nn.Module, *, output_dir: Path, resumed: bool) -> None: ...

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None: ...

    def on_task_end(self, model: torch.nn.Module, *, final_dir: Path, train_examples) -> list[Path]: ...


def build_strategies(cfg, tokenizer) -> list[Strategy]:
    """The strategies a job enables, from its config sections."""
    strategies: list[Strategy] = []
    if cfg.ewc.enabled:
        from distrib_ft.preservation.ewc import EWC

        strategies.append(EWC.from_config(cfg, tokenizer))
    return strategies
