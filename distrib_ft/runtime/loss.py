"""The training objective: next-token negative log-likelihood over the target tokens of a batch."""

from __future__ import annotations

import torch

from distrib_ft.data.formats import IGNORE_INDEX


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits, (B, T, V), for a collated batch.

    A batch with ``position_ids`` holds packed examples: it goes in without ``attention_mask``, so that Hugging
    Face derives a block-diagonal causal mask from the restarting positions (``masking_utils.
    find_packed_sequence_indices``; flash-attn: varlen) and no example attends to another.
    """
    if "position_ids" in batch:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return drop_virtual_tokens(logits, batch["input_ids"])


def drop_virtual_tokens(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of the real tokens only, (B, T, V).

    A method that prepends virtual tokens (peft's prompt tuning) returns (B, P + T, V); the first P positions
    are the virtual tokens' and predict nothing of the input.
    """
    extra = logits.size(1) - input_ids.size(1)
    return logits[:, extra:] if extra > 0 else logits


def token_nll_rows(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of next-token NLL over its target tokens (labels != -100), and their count.

    Args:
        model: a causal LM (or a DeepSpeed engine around one) returning ``logits`` of shape (B, T, V).
        batch: ``input_ids``, ``attention_mask``, ``labels``, each (B, T).

    Returns:
        ``(nll, targets)``, each of shape (B,); ``nll`` in fp32 nats, differentiable.
    """
    logits = forward_logits(model, batch)  # (B, T, V)
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    return nll.sum(dim=1), (shift_labels != IGNORE_INDEX).sum(dim=1)


def token_nll_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over the target tokens of a batch (a scalar tensor), and their count."""
    nll, targets = token_nll_rows(model, batch)
    return nll.sum(), int(targets.sum())
