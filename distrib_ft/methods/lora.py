"""LoRA and DoRA through peft: low-rank adapters on chosen linear layers; the base weights stay frozen.

LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (W + B @ A * alpha / r, B = 0
at the start). DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation". Biderman et al. 2024
("LoRA Learns Less and Forgets Less"): the best LoRA learning rate is ~10x full fine-tuning's, alpha = 2r,
all linear modules. final/ is a peft adapter (``PeftModel.from_pretrained`` loads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from distrib_ft.schema import InputPath, Strict


class LoRAConfig(Strict):
    """``method: {type: lora, ...}``: a peft LoRA (or DoRA) adapter."""

    type: Literal["lora"] = Field("lora", description="A peft LoRA adapter (the default method).")
    r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (alpha = 2r is a good default).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Modules that get adapters: attention and MLP projections, or 'all-linear'.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    merge_adapters: list[InputPath] = Field(default_factory=list, description=(
        "LoRA adapters of earlier rounds (their final/ folders), merged into the base weights in this order "
        "before the new adapter is added; the retraining chain of EWC-LoRA (ewc.target: lora_merged)."))

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: list[str] | str) -> list[str] | str:
        if not value:
            raise ValueError("list at least one module name (e.g. q_proj), or 'all-linear'")
        return value


class LoRA:
    name: ClassVar[str] = "lora"
    config_class: ClassVar[type[Strict]] = LoRAConfig
    checkpoint_trainable_only: ClassVar[bool] = True
    artifact: ClassVar[str] = "adapter"
    zero_stages: ClassVar[frozenset[int]] = frozenset({0, 1, 2, 3})
    mergeable: ClassVar[bool] = True
    new_parameters = True

    def __init__(self, config: LoRAConfig):
        self.config = config
        self.merged_update = not config.use_dora  # DoRA's update also rescales W's column norms

    def check(self, *, zero_stage: int, module_names: list[str] | None = None, config=None) -> None:
        c = self.config
        if zero_stage == 3 and c.merge_adapters:
            raise ValueError("method.merge_adapters: not supported under ZeRO-3 (merging needs whole weights); "
                             "use zero2.json, or merge the adapters into a model folder first")
        if zero_stage == 3 and c.use_dora:  # peft sizes DoRA's magnitude from W, partitioned to size 0 here
            raise ValueError("method.use_dora: DoRA is not supported under ZeRO-3; use zero2.json (or plain LoRA)")
        if module_names is not None and isinstance(c.target_modules, list):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
            for entry in c.target_modules:  # peft's rule: the whole name, or its last dotted parts
                if not any(n == entry or n.endswith("." + entry) for n in module_names):
                    raise ValueError(f"method.target_modules: {entry!r} matches no module of the model; modules that "
                                     f"can take an adapter are {', '.join(leaves)}")

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, PeftModel, TaskType, get_peft_model

        c = self.config
        for path in c.merge_adapters:  # earlier rounds: W <- W + B @ A * scale, in order
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=c.r, lora_alpha=c.lora_alpha,
                                 lora_dropout=c.lora_dropout, target_modules=c.target_modules, use_dora=c.use_dora,
                                 bias="none")
        try:
            return get_peft_model(model, peft_config)
        except ValueError as e:
            raise ValueError(f"method.target_modules: {e}".splitlines()[0]) from None

    def export(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
