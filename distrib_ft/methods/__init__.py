"""Fine-tuning methods: one file each, one line in ``METHODS``.

A method is a class with a pydantic config (one member of the job file's ``method:`` union, chosen by
``method.type``) and these members; nothing outside its file names it:

- ``name``, ``config_class``: the ``method.type`` value and the config it reads;
- ``artifact``: what ``final/`` holds, ``"adapter"`` (the trained parameters only, in peft's format or the
  method's own) or ``"model"`` (a whole Hugging Face model);
- ``checkpoint_trainable_only``: checkpoints leave the frozen weights out (they are rebuilt from the base
  model on resume): true for every method that freezes something;
- ``zero_stages``: the ZeRO stages it supports; ``check(zero_stage=...)`` refuses the others, and any
  other combination it cannot run, with a ValueError that names the key;
- ``apply(model)``: the model with the method in place and ``requires_grad`` set on what trains;
- ``export(model, state_dict, folder)``: write ``final/`` (``state_dict``: the full fp32 values of the
  parameters ``final/`` holds, gathered from every rank);
- ``mergeable``: final/ is, or can become, a plain Hugging Face model (``distrib-ft export --merge``);
- ``new_parameters``: the trained parameters are created by the method (an adapter), so their values at
  the start of another job are no anchor for EWC; ``merged_update``: the update is a dense low-rank
  product ``B @ A * scale`` on base weights (what EWC's ``target: lora_merged`` reads).

Optional members:

- ``lr_scale(name) -> float``: the multiplier of ``training.learning_rate`` for the trainable parameter
  ``name`` (layer-wise learning rates); the optimizer gets one parameter group per scale, and the schedule
  scales every group together;
- ``base_model(module)``: a context in which the method's module computes as the base model, for a method whose
  step 0 is not the base (prompt tuning); the loop measures the step-0 baselines, KL-to-base's reference and
  token masking's base pass inside it;
- ``owns_final(path) -> bool`` and ``load_final(base, path) -> module`` (static): a ``final/`` in the
  method's own format (neither a peft adapter nor a Hugging Face model), loaded for evaluation.

To add a method: a file here with its config class and its class, one line in ``METHODS``, one row in
``ROWS`` of tests/integration/test_methods.py (docs/architecture.md walks through a real one).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

import torch

from distrib_ft.methods.bitfit import BitFit
from distrib_ft.methods.bottleneck import Bottleneck
from distrib_ft.methods.full import Full
from distrib_ft.methods.lora import LoRA
from distrib_ft.methods.partial import Partial
from distrib_ft.methods.prompt_tuning import PromptTuning
from distrib_ft.methods.qlora import QLoRA
from distrib_ft.schema import Strict


class Method(Protocol):
    name: ClassVar[str]
    config_class: ClassVar[type[Strict]]
    artifact: ClassVar[str]
    checkpoint_trainable_only: ClassVar[bool]
    mergeable: ClassVar[bool]
    zero_stages: ClassVar[frozenset[int]]
    new_parameters: bool
    merged_update: bool

    def check(self, *, zero_stage: int, module_names: list[str] | None = None, config=None) -> None: ...

    def apply(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def export(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None: ...


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    Full, LoRA, QLoRA, Bottleneck, BitFit, PromptTuning, Partial)}
DEFAULT = "lora"


def build_method(config: Strict) -> Method:
    """The method object for a validated ``method:`` section."""
    return METHODS[config.type](config)


def checkpoint_trainable_only(method: Method) -> bool:
    """Whether checkpoints hold the trained parameters only (the frozen ones come from the base on resume)."""
    return method.checkpoint_trainable_only


def exports_trainable_only(method: Method) -> bool:
    """Whether final/ holds the trained parameters only (an adapter) or the whole model."""
    return method.artifact == "adapter"


def load_trained(base: str, path: str | Path, *, load_model) -> torch.nn.Module:
    """A ``final/`` folder as a model for evaluation.

    A method's own format (its ``owns_final``), a peft adapter on ``base`` (adapter_config.json), or a whole
    Hugging Face model. ``load_model(path)`` loads a plain model folder.

    Raises:
        ValueError: ``path`` holds neither.
    """
    path = Path(path)
    for cls in METHODS.values():
        if hasattr(cls, "owns_final") and cls.owns_final(path):
            return cls.load_final(base, path, load_model=load_model)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_model(base), str(path))
    if (path / "config.json").is_file():
        return load_model(str(path))
    raise ValueError(f"--model: {path} holds neither a peft adapter (adapter_config.json) nor a Hugging Face model "
                     "(config.json)")
