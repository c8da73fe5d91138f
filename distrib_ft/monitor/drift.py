"""KL-to-base drift: how far the model's next-token distributions have moved from the base model's.

Measured on the new task's eval data: a cheap forgetting signal that needs no old data (RL's Razor, arXiv 2509.04259:
forgetting tracks the forward KL between the base and the tuned model on the new task's data).

``KL(base || current)`` per target token, averaged over every target token of ``data.eval_files`` (all ranks
together), is approximated on the base model's top ``k`` tokens at each position:
``sum_{j in topk} p_base(j) * (log p_base(j) - log p_cur(j))``. The base's top-k log-probabilities are computed
once, before the first update (also on a resumed job: before its checkpoint is loaded), and kept on each rank
for its own share of the eval set. The omitted tail makes the value a lower bound of the full KL when the
base's top-k mass is near 1 (it reports that mass as ``kl_topk_mass``).
"""

from __future__ import annotations

import torch

from distrib_ft.data.formats import IGNORE_INDEX, collate
from distrib_ft.runtime import dist
from distrib_ft.runtime.loss import forward_logits


def _target_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the next token at every target position: (N, V), and the mask (B, T-1) they fill."""
    logits = forward_logits(model, batch)[:, :-1].float()
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return torch.log_softmax(logits[mask], dim=-1), mask


@torch.no_grad()
def base_top_k(model, dataset, *, k: int, batch_size: int, pad_token_id: int) -> list[tuple]:
    """This rank's cache: per batch of its share, the base's top-``k`` token ids and log-probs, (N, k) each."""
    was_training, cache = model.training, []
    model.eval()
    for idx, run in dist.share_batches(len(dataset), batch_size):
        batch = {key: v.to(dist.device()) for key, v in collate([dataset[i] for i in run], pad_token_id).items()}
        logp, _ = _target_logprobs(model, batch)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        cache.append((bool(idx), top.indices, top.values))
    model.train(was_training)
    return cache


@torch.no_grad()
def kl_to_base(model, dataset, cache: list[tuple], *, batch_size: int, pad_token_id: int) -> dict[str, float]:
    """``kl_to_base`` (nats per target token, all ranks) and ``kl_topk_mass`` (the base's mass in its top k)."""
    was_training = model.training
    model.eval()
    kl, mass, tokens = 0.0, 0.0, 0
    for (_, run), (real, top_ids, top_logp) in zip(dist.share_batches(len(dataset), batch_size), cache):
        batch = {key: v.to(dist.device()) for key, v in collate([dataset[i] for i in run], pad_token_id).items()}
        logp, _ = _target_logprobs(model, batch)
        if real:  # a rank whose share ran out repeats a batch to keep ZeRO-3's gathers in step; not counted
            p_base = top_logp.exp()
            kl += float((p_base * (top_logp - logp.gather(-1, top_ids))).sum())
            mass += float(p_base.sum())
            tokens += int(top_ids.shape[0])
    model.train(was_training)
    kl, mass, tokens = dist.all_reduce_sum([kl, mass, tokens])
    return {"kl_to_base": kl / max(tokens, 1), "kl_topk_mass": mass / max(tokens, 1)}
