"""Where a parameter sits in a decoder-only transformer: embeddings, decoder layer l of L, or the head.

Used by the methods that train or scale parts of the model by depth (partial training, layer-wise learning
rates). Decoder layers are found by name (``...layers.<l>....``, the Hugging Face convention of Llama, Mistral,
Qwen, Gemma, ...) and L is ``config.num_hidden_layers``.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer of parameter ``name`` (0 = the lowest), or None outside the decoder layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def embedding_names(model: torch.nn.Module) -> set[str]:
    """Names of the input embeddings' parameters (as ``named_parameters`` lists them)."""
    embeddings = model.get_input_embeddings()
    ids = {id(p) for p in embeddings.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def layerwise_lr_scale(name: str, *, num_layers: int, decay: float, embeddings: set[str]) -> float:
    """The learning-rate multiplier of parameter ``name`` under layer-wise LR decay ``decay`` (d).

    Decoder layer l of L gets d^(L-1-l), the input embeddings d^L (the lowest), everything above the layers
    (final norm, head) 1. Layer-wise LR decay: Howard & Ruder 2018 ("Universal Language Model Fine-tuning",
    discriminative fine-tuning) and Clark et al. 2020 (ELECTRA), where d in 0.7-0.95 is usual.

    Returns:
        A float in (0, 1].
    """
    if name in embeddings:
        return decay ** num_layers
    layer = layer_index(name)
    return 1.0 if layer is None else decay ** (num_layers - 1 - layer)


def model_config(config):
    """The job's model config (``AutoConfig`` of ``config.model.name_or_path``).

    None without a job or a readable folder (the driver's checks then skip what needs it).
    """
    if config is None:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(config.model.name_or_path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError):
        return None
