"""Partial training: the head, the top K decoder layers, or everything but the embeddings; layer-wise LR.

What trains:

- ``train_head``: the output head (``lm_head``) and the final norm above the decoder layers;
- ``top_k_layers``: the top K decoder layers (0: none, the head alone; null: all of them);
- ``freeze_embeddings``: the input embeddings stay frozen (true) or train at the lowest learning rate.

On a model whose head shares its matrix with the input embeddings (``tie_word_embeddings``, SmolLM2 among
them), training the head while the embeddings stay frozen *unties* them: the head gets its own copy of the
matrix (initialised from it, so step 0 equals the base), and final/'s config says ``tie_word_embeddings:
false`` (final/ grows by vocab x hidden parameters).

``layerwise_lr_decay`` d gives decoder layer l (0 = lowest of L) the learning rate lr * d^(L-1-l), the head lr,
trainable embeddings lr * d^L (distrib_ft/methods/layers.py): as optimizer parameter groups the DeepSpeed engine
receives, scaled together by the schedule. Frozen weights never reach the optimizer; checkpoints hold what trains
(the rest is the base model's). final/ is the whole model in Hugging Face format.

Sources: "head only" and "top-K layers" are the classic feature-extraction / partial fine-tuning baselines
(Howard & Ruder 2018, "Universal Language Model Fine-tuning", gradual unfreezing and discriminative learning
rates; Lee et al. 2019, "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning").
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from distrib_ft.methods.layers import embedding_names, layer_index, layerwise_lr_scale, model_config
from distrib_ft.schema import Strict


class PartialConfig(Strict):
    """``method: {type: partial, ...}``: train the head, the top K decoder layers and/or the embeddings."""

    type: Literal["partial"] = Field("partial", description="Partial training: only the chosen parts train.")
    train_head: bool = Field(True, description="The output head (lm_head) and the final norm train.")
    top_k_layers: int | None = Field(None, ge=0, description=(
        "How many of the top decoder layers train: 0 = none (with train_head: head only), null = all."))
    freeze_embeddings: bool = Field(True, description="The input embeddings stay frozen.")
    layerwise_lr_decay: float = Field(1.0, gt=0, le=1, description=(
        "d: decoder layer l of L trains at learning_rate * d^(L-1-l), the head at learning_rate, trainable "
        "embeddings at learning_rate * d^L; 1.0 = one learning rate."))


class Partial:
    name: ClassVar[str] = "partial"
    config_class: ClassVar[type[Strict]] = PartialConfig
    artifact: ClassVar[str] = "model"
    checkpoint_trainable_only: ClassVar[bool] = True
    zero_stages: ClassVar[frozenset[int]] = frozenset({0, 1, 2, 3})
    mergeable: ClassVar[bool] = True  # final/ is a whole model already
    new_parameters = False
    merged_update = False

    def __init__(self, config: PartialConfig):
        self.config = config
        self.num_layers = 0
        self.embeddings: set[str] = set()

    def check(self, *, zero_stage: int, module_names: list[str] | None = None, config=None) -> None:
        c = self.config
        if not c.train_head and c.top_k_layers == 0 and c.freeze_embeddings:
            raise ValueError("method: nothing trains (train_head: false, top_k_layers: 0, freeze_embeddings: true); "
                             "set train_head: true or top_k_layers above 0")
        hf_config = model_config(config)
        if hf_config is None:
            return
        layers = hf_config.num_hidden_layers
        if c.top_k_layers is not None and c.top_k_layers > layers:
            raise ValueError(f"method.top_k_layers: {c.top_k_layers} but the model has {layers} decoder layers; "
                             f"use at most {layers} (or null for all)")
        if zero_stage == 3 and self._unties(hf_config):
            raise ValueError("method.freeze_embeddings: training the head of a model with tied embeddings unties "
                             "them, which needs whole weights (not ZeRO-3 partitions); use zero2.json, or "
                             "freeze_embeddings: false")

    def _unties(self, model_config) -> bool:
        return bool(getattr(model_config, "tie_word_embeddings", False)) and self.config.train_head \
            and self.config.freeze_embeddings

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        c = self.config
        self.num_layers = model.config.num_hidden_layers
        if self._unties(model.config):
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
        self.embeddings = embedding_names(model)
        lowest = 0 if c.top_k_layers is None else self.num_layers - c.top_k_layers
        for name, p in model.named_parameters():
            layer = layer_index(name)
            if name in self.embeddings:
                trains = not c.freeze_embeddings
            elif layer is not None:
                trains = layer >= lowest
            else:
                trains = c.train_head
            p.requires_grad_(trains)
        return model

    def lr_scale(self, name: str) -> float:
        return layerwise_lr_scale(name, num_layers=self.num_layers, decay=self.config.layerwise_lr_decay,
                                  embeddings=self.embeddings)

    def export(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
