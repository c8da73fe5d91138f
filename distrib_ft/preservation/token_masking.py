"""Selective Token Masking (STM; Wu et al., NeurIPS 2025, arXiv 2501.14315).

Before training, the base model scores every target token of the new data: a response token whose
base-model perplexity ``exp(NLL)`` exceeds ``threshold`` (tau, 2.5 in the paper) is dropped from the
loss (its label becomes -100). Those are the tokens the model finds most surprising, whose gradients
pull it furthest from what it already knows. ``mode="random"`` masks the same number of target tokens
chosen uniformly at random -- the control that says whether the choice of tokens matters or only
the amount.

The base-model pass is distributed (each rank scores every ``world``-th example, with as many forward
passes as the others so that ZeRO-3 can gather parameters) and cached in
``output_dir/token_masking/`` keyed by the model and the data's fingerprint, so a resumed job (whose
model is no longer the base model) reuses the first pass. The masked fraction is printed, written to
metrics.jsonl at step 0 and to summary.json: STM only helps where the base model is already partly
competent, so always look at it.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from distrib_ft.data.formats import IGNORE_INDEX, collate
from distrib_ft.runtime import dist
from distrib_ft.runtime.loss import forward_logits
from distrib_ft.schema import Strict


class TokenMaskingConfig(Strict):
    """``token_masking:``: Selective Token Masking (Wu et al. 2025) of the new data's responses.

    Drop from the loss the tokens the base model finds surprising, which pull it furthest from what it knows.
    """

    mode: Literal["off", "stm", "random"] = Field("off", description=(
        "stm: mask target tokens whose base-model perplexity exp(NLL) exceeds threshold; random: mask the same "
        "number of target tokens chosen at random (the control); off."))
    threshold: float = Field(2.5, gt=1, description=(
        "tau: the perplexity above which a token is masked (2.5 in the paper)."))
    batch_size: int = Field(8, ge=1, description="Sequences per forward in the base-model pass.")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def check_job(self, job) -> None:
        """Cross-checks with the rest of the job (ValueError naming the key)."""
        if self.mode != "off" and job.data.streaming:
            raise ValueError("token_masking: needs map-style data (data.streaming=false): the base-model pass "
                             "runs over the whole training set before training")


class TokenMasking:
    name: ClassVar[str] = "token_masking"
    config_class: ClassVar[type[Strict]] = TokenMaskingConfig

    def __init__(self, config: TokenMaskingConfig, ctx):
        self.config, self.ctx = config, ctx
        self.stats: dict | None = None
        self._reported = False

    def prepare_train_data(self, model, dataset):
        """The training set with the masked labels (the base-model pass is cached in output_dir)."""
        c = self.config
        masked, self.stats = apply_token_masking(model, dataset, mode=c.mode, threshold=c.threshold,
                                                 batch_size=c.batch_size, pad_token_id=self.ctx.tokenizer.pad_token_id,
                                                 output_dir=self.ctx.output_dir, model_name=self.ctx.model_name,
                                                 seed=self.ctx.seed)
        return masked

    def metrics(self) -> dict:
        """``masked_fraction`` and ``masked_tokens``, once (in the first line)."""
        if self._reported or self.stats is None:
            return {}
        self._reported = True
        return {"masked_fraction": self.stats["masked_fraction"], "masked_tokens": self.stats["masked_tokens"]}

    def summary(self) -> dict:
        return {"token_masking": self.stats}

    def state_dict(self) -> dict:
        return {"reported": self._reported}

    def load_state_dict(self, state: dict) -> None:
        self._reported = bool(state.get("reported"))


@torch.no_grad()
def base_token_nll(model, dataset, *, batch_size: int, pad_token_id: int) -> list[np.ndarray]:
    """Per example, the NLL of every label position, as a float32 array of the example's length.

    Entry t scores label t given tokens < t; NaN where label t is not a target, and at t = 0. Computed by all
    ranks together; every rank gets the whole list.
    """
    was_training = model.training
    model.eval()
    out: dict[int, np.ndarray] = {}
    for idx, run in dist.share_batches(len(dataset), batch_size):
        batch = {k: v.to(dist.device()) for k, v in collate([dataset[i] for i in run], pad_token_id).items()}
        logits = forward_logits(model, batch)[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                reduction="none")
        nll = torch.where(labels == IGNORE_INDEX, torch.nan, nll).cpu().numpy()
        for row, i in enumerate(idx):
            n = len(dataset[i]["input_ids"])
            out[i] = np.concatenate([[np.nan], nll[row, :n - 1]]).astype(np.float32)
    model.train(was_training)
    return dist.gather_shares(out, len(dataset))


def choose_masks(nll: list[np.ndarray], *, mode: str, threshold: float, seed: int) -> list[np.ndarray]:
    """Boolean masks (True = drop from the loss) over the target positions of each example.

    ``stm``: targets with exp(NLL) > threshold. ``random``: as many targets as ``stm`` would mask,
    drawn uniformly from all target positions (seeded).
    """
    above = [np.nan_to_num(x, nan=-np.inf) > math.log(threshold) for x in nll]
    if mode == "stm":
        return above
    if mode != "random":
        raise ValueError(f"token_masking.mode: {mode!r} is not stm or random")
    targets = [np.flatnonzero(~np.isnan(x)) for x in nll]
    flat = np.concatenate([np.stack([np.full(len(t), i), t], 1) for i, t in enumerate(targets)] or [np.zeros((0, 2))])
    count = int(sum(a.sum() for a in above))
    picked = flat[np.random.default_rng(seed).choice(len(flat), size=count, replace=False)].astype(int)
    masks = [np.zeros(len(x), dtype=bool) for x in nll]
    for i, t in picked:
        masks[i][t] = True
    return masks


def apply_token_masking(model, dataset, *, mode: str, threshold: float, batch_size: int, pad_token_id: int,
                        output_dir: Path, model_name: str, seed: int):
    """The dataset with masked labels, and its statistics. Runs on every rank.

    The statistics: ``{"mode", "threshold", "masked_tokens", "target_tokens", "masked_fraction"}``.
    """
    key = hashlib.sha256(f"{model_name}|{dataset._fingerprint}".encode()).hexdigest()[:16]
    cache = Path(output_dir) / "token_masking" / f"base_nll-{key}.npz"
    cached = dist.all_reduce_sum([float(dist.is_main() and cache.exists())])[0] > 0
    if cached:
        nll = dist.broadcast_object(_load(cache) if dist.is_main() else None)
        dist.print0(f"token masking: base-model NLL from {cache}")
    else:
        dist.print0(f"token masking: scoring {len(dataset):,} examples with the base model")
        nll = base_token_nll(model, dataset, batch_size=batch_size, pad_token_id=pad_token_id)
        if dist.is_main():
            _save(cache, nll)
    masks = choose_masks(nll, mode=mode, threshold=threshold, seed=seed)
    labels = [np.where(m, IGNORE_INDEX, np.asarray(ex["labels"])).tolist()
              for m, ex in zip(masks, dataset.select_columns(["labels"]))]
    masked = dataset.remove_columns(["labels"]).add_column("labels", labels,
                                                           new_fingerprint=f"{key}-{mode}-{threshold}")
    targets = int(sum((~np.isnan(x)).sum() for x in nll))
    count = int(sum(m.sum() for m in masks))
    stats = {"mode": mode, "threshold": threshold, "masked_tokens": count, "target_tokens": targets,
             "masked_fraction": count / max(targets, 1)}
    dist.print0(f"token masking ({mode}, tau={threshold}): {count:,} of {targets:,} target tokens masked "
                f"({stats['masked_fraction']:.1%})")
    if stats["masked_fraction"] > 0.9:
        dist.print0("token masking: warning: over 90% of the targets are masked, so little is left to learn; the base "
                    "model finds this data surprising (STM helps where it is partly competent): raise "
                    "token_masking.threshold or turn it off")
    dist.barrier()
    return masked, stats


def _save(path: Path, nll: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")
    np.savez(tmp, values=np.concatenate(nll) if nll else np.zeros(0, np.float32),
             offsets=np.cumsum([0] + [len(x) for x in nll]))
    os.replace(tmp, path)


def _load(path: Path) -> list[np.ndarray]:
    with np.load(path) as f:
        values, offsets = f["values"], f["offsets"]
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
