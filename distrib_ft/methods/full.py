"""Full fine-tuning: every parameter trains; final/ is the whole model in Hugging Face format."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from distrib_ft.schema import Strict


class FullConfig(Strict):
    """``method: {type: full}``: all weights train (use a small learning rate, e.g. 1e-5 to 3e-5)."""

    type: Literal["full"] = Field("full", description="Full fine-tuning.")


class Full:
    name: ClassVar[str] = "full"
    config_class: ClassVar[type[Strict]] = FullConfig
    checkpoint_trainable_only: ClassVar[bool] = False
    artifact: ClassVar[str] = "model"
    zero_stages: ClassVar[frozenset[int]] = frozenset({0, 1, 2, 3})
    new_parameters = False
    merged_update = False

    def __init__(self, config: FullConfig):
        self.config = config

    def check(self, *, zero_stage: int, module_names: list[str] | None = None, config=None) -> None:
        return None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def export(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
