"""BitFit: only bias terms train.

Ben Zaken, Ravfogel and Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models" (ACL 2022): freeze every weight matrix and train the bias vectors alone.

``method: {type: bitfit, add_bias: false, target_modules: [...]}``; ``target_modules`` (default: every linear module
of the decoder layers) follows peft's rule: an entry matches a module's whole name or its last dotted parts.

- ``add_bias: false``: the existing biases of the target modules train; final/ is the whole model in Hugging Face
  format (``artifact: model``), checkpoints hold the biases only. Llama-family models (SmolLM2 among them) have no
  biases in their linear layers (``attention_bias``/``mlp_bias`` false): the job stops at start-up and points to
  ``add_bias: true``.
- ``add_bias: true``: a zero-initialised trainable bias vector is added to the output of every target module, through
  peft's BEFT tuner (``peft.tuners.beft``: ``BeftConfig``/``get_peft_model``; one ``beft_bias`` of shape
  ``(1, out_features)`` per module, added after the module's own output); step 0 equals the base model exactly.
  final/ is a peft adapter (``artifact: adapter``, ``PeftModel.from_pretrained`` loads it).

Mergeable: a trained bias is a plain bias. With ``add_bias: false`` final/ is already a whole model; with
``add_bias: true`` peft's BEFT ``merge`` adds the vector to the base layer's bias, and refuses a base layer that has
none (a Llama base then needs ``attention_bias``/``mlp_bias`` set and zero biases on the untargeted modules of
that group before merging).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from distrib_ft.schema import Strict


class BitFitConfig(Strict):
    """``method: {type: bitfit, ...}``: only bias terms train (existing ones, or zero-initialised new ones)."""

    type: Literal["bitfit"] = Field("bitfit", description="BitFit: only the biases of the target modules train.")
    add_bias: bool = Field(False, description=(
        "false: train the target modules' existing biases (the model must have some); true: add a zero-initialised "
        "trainable bias to every target module (peft BEFT), for models without biases such as Llama and SmolLM2."))
    target_modules: list[str] | None = Field(None, description=(
        "Linear modules whose biases train (a module's whole name or its last dotted parts, e.g. q_proj); "
        "null: every linear module of the decoder layers."))

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("list at least one module name (e.g. q_proj), or leave it out for every linear module")
        return value


def _matches(name: str, entries: list[str]) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def _in_decoder_layer(name: str) -> bool:
    return ".layers." in f".{name}"


def target_linears(model: torch.nn.Module, target_modules: list[str] | None) -> dict[str, torch.nn.Linear]:
    """The target Linear modules of ``model`` by name (default: every Linear inside the decoder layers)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (_matches(n, target_modules) if target_modules is not None else _in_decoder_layer(n))}


def _skeleton(config) -> torch.nn.Module | None:
    """The job's model built on the meta device (no weights read), or None when its config cannot be read."""
    if config is None:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = config.model.trust_remote_code
    try:
        hf_config = AutoConfig.from_pretrained(config.model.name_or_path, trust_remote_code=trust)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust)
    except (OSError, ValueError):
        return None


class BitFit:
    name: ClassVar[str] = "bitfit"
    config_class: ClassVar[type[Strict]] = BitFitConfig
    checkpoint_trainable_only: ClassVar[bool] = True
    zero_stages: ClassVar[frozenset[int]] = frozenset({0, 1, 2, 3})
    mergeable: ClassVar[bool] = True
    merged_update = False
    artifact: str = "model"  # per job: "adapter" with add_bias (a peft BEFT adapter), else the whole model

    def __init__(self, config: BitFitConfig):
        self.config = config
        self.artifact = "adapter" if config.add_bias else "model"
        self.new_parameters = config.add_bias  # added biases start at 0: no anchor in the base model

    def check(self, *, zero_stage: int, module_names: list[str] | None = None, config=None) -> None:
        c = self.config
        if module_names is not None and c.target_modules is not None:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names if _in_decoder_layer(n)})
            for entry in c.target_modules:
                if not any(n == entry or n.endswith("." + entry) for n in module_names):
                    raise ValueError(f"method.target_modules: {entry!r} matches no module of the model; linear modules "
                                     f"of its decoder layers are {', '.join(leaves)}")
        skeleton = _skeleton(config)
        if skeleton is None:
            return
        targets = target_linears(skeleton, c.target_modules)
        if not targets:
            raise ValueError("method.target_modules: no linear module of the model matches; list e.g. q_proj, v_proj")
        if not c.add_bias and all(m.bias is None for m in targets.values()):
            raise ValueError(f"method.add_bias: {type(skeleton).__name__} has no bias in its target linear modules "
                             "(e.g. Llama's attention_bias/mlp_bias are false), so nothing would train; set "
                             "method.add_bias: true to add zero-initialised trainable biases")

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        c = self.config
        targets = target_linears(model, c.target_modules)
        if not targets:
            raise ValueError("method.target_modules: no linear module of the model matches; list e.g. q_proj, v_proj")
        if c.add_bias:
            from peft import BeftConfig, get_peft_model

            # Default: the leaf names of the decoder layers' linear modules (peft matches a name's last parts).
            names = c.target_modules or sorted({n.rsplit(".", 1)[-1] for n in targets})
            return get_peft_model(model, BeftConfig(task_type="CAUSAL_LM", target_modules=names))
        for p in model.parameters():
            p.requires_grad_(False)
        trained = [m.bias for m in targets.values() if m.bias is not None]
        if not trained:
            raise ValueError("method.add_bias: the target linear modules have no bias, so nothing would train; set "
                             "method.add_bias: true to add zero-initialised trainable biases")
        for bias in trained:
            bias.requires_grad_(True)
        return model

    def export(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
