"""Bottleneck adapters: a small trained MLP with a residual after a decoder layer's attention and/or MLP block.

``method: {type: adapter, adapter_type: houlsby | pfeiffer, reduction_factor: 16, non_linearity: relu}``.

- Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP": one adapter after the attention block and
  one after the MLP block of every decoder layer (``adapter_type: houlsby``).
- Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning" (EACL 2021; arXiv
  2020): one adapter after the MLP block only (``adapter_type: pfeiffer``), about half the parameters.

An adapter maps a block's output ``h`` (before the decoder layer adds its residual stream) to
``h + up(act(down(h)))`` with ``down: hidden -> hidden / reduction_factor`` and ``up`` back to ``hidden`` (both
with biases). ``up`` starts at zero (weight and bias), so at step 0 the model is the base model exactly; ``down``
starts as ``torch.nn.Linear`` does (Kaiming-uniform), so ``up`` gets gradients from the first step. The adapter is a
child module of the block (``model.layers.<l>.self_attn.bottleneck_adapter`` and ``...mlp.bottleneck_adapter``)
and adds its term through a forward hook (the attention block returns a tuple: its element 0 changes): the base
model's parameter names stay as they were. Decoder layers are found as ``model.model.layers`` with ``self_attn``
and ``mlp`` in every layer (Llama, Mistral, Qwen, Gemma, SmolLM2, ...); other layouts are refused at start-up.
Written here because no maintained library fits: AdapterHub's ``adapters`` pins older transformers, and peft has no
bottleneck adapter (its ``register_peft_method`` only accepts names already in its ``PeftType`` enum).

ZeRO-2 and ZeRO-3: the adapters are created after the base model loads (under ZeRO-3 its weights are partitioned
then) and ``deepspeed.initialize`` partitions them too; the hooks run inside the blocks' gathered forward.

``final/`` holds ``bottleneck_config.json`` (adapter_type, reduction_factor, non_linearity,
base_model_name_or_path) and ``adapter_model.safetensors`` (the adapter tensors only, by their names in the
model, fp32). Load it with::

    from distrib_ft.methods.bottleneck import load_bottleneck
    model = load_bottleneck(base_model, "outputs/run/final")   # base_model: the Hugging Face model it was trained on

(``distrib_ft.methods.load_trained`` and ``distrib-ft eval`` do the same through ``owns_final``/``load_final``.)

Not mergeable: the adapter is non-linear in ``h``, so it cannot be folded into the base weights; the trained model
is always the base model plus ``final/`` (:data:`MERGEABLE`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from distrib_ft.methods.layers import model_config
from distrib_ft.schema import Strict

MERGEABLE = False  # h + up(act(down(h))) is not linear in h: no base weight can absorb it
CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER = "bottleneck_adapter"  # the child module's name inside a block
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}
_BLOCKS = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}


class BottleneckConfig(Strict):
    """``method: {type: adapter, ...}``: bottleneck adapters (Houlsby or Pfeiffer placement)."""

    type: Literal["adapter"] = Field("adapter", description="Bottleneck adapters in every decoder layer.")
    adapter_type: Literal["houlsby", "pfeiffer"] = Field("houlsby", description=(
        "houlsby: an adapter after the attention block and one after the MLP block of every decoder layer; "
        "pfeiffer: one after the MLP block only."))
    reduction_factor: int = Field(16, ge=1, description=(
        "The bottleneck is hidden_size / reduction_factor wide (16 on a 576-wide model: 36)."))
    non_linearity: Literal["relu", "gelu", "silu"] = Field("relu", description="The activation in the bottleneck.")


class BottleneckAdapter(torch.nn.Module):
    """``h + up(act(down(h)))``; ``up`` is zero at the start, so the adapter starts as the identity."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str, *, dtype=None, device=None):
        super().__init__()
        self.down = torch.nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = torch.nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _add_adapter(module: torch.nn.Module, args, output):
    """Forward hook of a block: its output (element 0 of a tuple) through the block's adapter."""
    adapter = getattr(module, ADAPTER)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Llama-family causal LM (``model.model.layers``, each with self_attn and mlp).

    Raises:
        ValueError: another layout.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers) or not all(
            hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers):
        raise ValueError(f"method.type: adapter needs a Llama-family layout (model.layers.<l>.self_attn and .mlp); "
                         f"{type(model).__name__} has none; use method.type: lora")
    return layers


def attach(model: torch.nn.Module, config: BottleneckConfig) -> list[str]:
    """Add the adapters and their hooks to ``model`` in place; returns the blocks that got one."""
    hidden = int(model.config.hidden_size)
    bottleneck = hidden // config.reduction_factor
    if bottleneck < 1:
        raise ValueError(f"method.reduction_factor: {config.reduction_factor} leaves no bottleneck on hidden size "
                         f"{hidden}; use at most {hidden}")
    reference = next(model.parameters())
    done = []
    for i, layer in enumerate(decoder_layers(model)):
        for block_name in _BLOCKS[config.adapter_type]:
            block = getattr(layer, block_name)
            if hasattr(block, ADAPTER):
                raise ValueError(f"method.type: model.layers.{i}.{block_name} already has a bottleneck adapter")
            block.add_module(ADAPTER, BottleneckAdapter(hidden, bottleneck, config.non_linearity,
                                                        dtype=reference.dtype, device=reference.device))
            block.register_forward_hook(_add_adapter)
            done.append(f"model.layers.{i}.{block_name}")
    return done


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapters' parameters in ``model``."""
    return [n for n, _ in model.named_parameters() if f".{ADAPTER}." in n]


def load_bottleneck(base_model: torch.nn.Module, path: str | Path, *, is_trainable: bool = False) -> torch.nn.Module:
    """The base model with the bottleneck adapters of ``path`` (a ``final/`` of ``method.type: adapter``).

    ``base_model`` is changed in place and returned; with ``is_trainable`` false every parameter is frozen.

    Raises:
        ValueError: ``path`` is not such a folder, or its tensors do not fit ``base_model``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"--model: {path} has no {CONFIG_FILE}: not a bottleneck adapter")
    saved = json.loads((path / CONFIG_FILE).read_text())
    config = BottleneckConfig.model_validate({k: saved[k] for k in ("adapter_type", "reduction_factor",
                                                                    "non_linearity")})
    attach(base_model, config)
    tensors = load_file(str(path / WEIGHTS_FILE))
    expected = set(adapter_names(base_model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"--model: {path / WEIGHTS_FILE} does not fit this base model (missing "
                         f"{missing[:2]}, unexpected {extra[:2]}); load it on {saved.get('base_model_name_or_path')}")
    own = dict(base_model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if own[name].shape != value.shape:
                raise ValueError(f"--model: {name} is {tuple(value.shape)} in {path} but "
                                 f"{tuple(own[name].shape)} on this base model")
            own[name].copy_(value)
    for name, p in base_model.named_parameters():
        p.requires_grad_(is_trainable and name in expected)
    return base_model


class Bottleneck:
    name: ClassVar[str] = "adapter"
    config_class: ClassVar[type[Strict]] = BottleneckConfig
    artifact: ClassVar[str] = "adapter"
    checkpoint_trainable_only: ClassVar[bool] = True
    zero_stages: ClassVar[frozenset[int]] = frozenset({0, 1, 2, 3})
    mergeable: ClassVar[bool] = MERGEABLE
    new_parameters = True
    merged_update = False

    def __init__(self, config: BottleneckConfig):
        self.config = config

    def check(self, *, zero_stage: int, module_names: list[str] | None = None, config=None) -> None:
        if module_names is not None:
            for block in _BLOCKS[self.config.adapter_type]:
                if not any(re.match(rf"model\.layers\.\d+\.{block}\.", n) for n in module_names):
                    raise ValueError(f"method.type: adapter needs a Llama-family layout (model.layers.<l>.{block}); "
                                     "this model has none; use method.type: lora")
        hf_config = model_config(config)
        if hf_config is not None and getattr(hf_config, "hidden_size", None):
            hidden = int(hf_config.hidden_size)
            if hidden // self.config.reduction_factor < 1:
                raise ValueError(f"method.reduction_factor: {self.config.reduction_factor} leaves no bottleneck on "
                                 f"hidden size {hidden}; use at most {hidden}")

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        attach(model, self.config)
        for name, p in model.named_parameters():
            if f".{ADAPTER}." in name:
                p.requires_grad_(True)
        return model

    def export(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        c = self.config
        meta = {"adapter_type": c.adapter_type, "reduction_factor": c.reduction_factor,
                "non_linearity": c.non_linearity,
                "base_model_name_or_path": getattr(model, "name_or_path", None) or None}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tensors = {k: v.contiguous() for k, v in state_dict.items() if f".{ADAPTER}." in k}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

    @staticmethod
    def owns_final(path: Path) -> bool:
        return (Path(path) / CONFIG_FILE).is_file()

    @staticmethod
    def load_final(base: str, path: Path, *, load_model) -> torch.nn.Module:
        return load_bottleneck(load_model(base), path)
