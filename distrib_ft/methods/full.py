"""Full fine-tuning: every parameter trains; final/ is the whole model in Hugging Face format.

``layerwise_lr_decay`` d < 1 gives lower layers smaller learning rates (decoder layer l of L: lr * d^(L-1-l),
embeddings lr * d^L; distrib_ft/methods/layers.py), a mild defence against forgetting: the general features of
the lower layers move least (Howard & Ruder 2018, discriminative fine-tuning).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from distrib_ft.methods.layers import embedding_names, layerwise_lr_scale
from distrib_ft.schema import Strict


class FullConfig(Strict):
    """``method: {type: full}``: all weights train (use a small learning rate, e.g. 1e-5 to 3e-5)."""

    type: Literal["full"] = Field("full", description="Full fine-tuning.")
    layerwise_lr_decay: float = Field(1.0, gt=0, le=1, description=(
        "d: decoder layer l of L trains at learning_rate * d^(L-1-l), the head at learning_rate, the embeddings "
        "at learning_rate * d^L; 1.0 = one learning rate."))


class Full:
    name: ClassVar[str] = "full"
    config_class: ClassVar[type[Strict]] = FullConfig
    checkpoint_trainable_only: ClassVar[bool] = False
    artifact: ClassVar[str] = "model"
    zero_stages: ClassVar[frozenset[int]] = frozenset({0, 1, 2, 3})
    new_parameters = False
    merged_update = False

    mergeable: ClassVar[bool] = True  # final/ is a whole model already

    def __init__(self, config: FullConfig):
        self.config = config
        self.num_layers = 0
        self.embeddings: set[str] = set()

    def check(self, *, zero_stage: int, module_names: list[str] | None = None, config=None) -> None:
        return None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        self.num_layers, self.embeddings = model.config.num_hidden_layers, embedding_names(model)
        return model

    def lr_scale(self, name: str) -> float:
        return layerwise_lr_scale(name, num_layers=self.num_layers, decay=self.config.layerwise_lr_decay,
                                  embeddings=self.embeddings)

    def export(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
