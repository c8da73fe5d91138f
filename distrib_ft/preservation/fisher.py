"""Diagonal Fisher information, computed per rank and all-reduced, and its safetensors artifact.

Estimators (s: a sequence of the Fisher data; targets(s): its tokens that carry loss -- responses for
alpaca/chat, every token after the first for text/tokenized; N sequences in all):

``empirical``  F_i = (1/N) sum_s ( d/dtheta_i sum_{t in targets(s)} log p(y_t | y_<t) )^2
               with the data tokens y_t; one backward per sequence (batch 1, no padding).
``sampled``    the true Fisher: the same with each y_t drawn from the model under teacher forcing
               (the data prefix is kept). The scores of different sequences are independent and have
               zero mean, so for a micro-batch B of sequences E[(sum_{s in B} g_s)^2] =
               sum_{s in B} E[g_s^2]; F_i = (1/N) sum_B (sum_{s in B} g_s)^2 is unbiased and costs one
               backward per micro-batch (the B * gbar^2 form).
``batched``    F_i = (1/M) sum_B ( d/dtheta_i mean-token-NLL(B) )^2 over M micro-batches, as Avalanche and
               TRACE compute it. Biased (low by up to the batch size); for comparison only.

Gradients come from ``torch.autograd.grad`` on the module's parameters, so they are this rank's own:
DeepSpeed's reduction hooks (which average over ranks) never see them, and nothing lands in ``.grad``.
Under ZeRO-3 the module's forward gathers each parameter and the gradient comes back full size.

Distributed: each rank sums over its own shard of the sequences (``rank::world``), then the sums and
the counts are all-reduced (SUM) and divided once, so the result does not depend on the number of
ranks. Under ZeRO-3 with partitioned parameters (``sharded=True``) the sums are reduce-scattered instead:
each rank keeps F of its own partition only (distrib_ft/preservation/zero3.py).
Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively);
a rank with a shorter shard runs zero-weight passes. F is accumulated and returned in fp32.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from distrib_ft.runtime import dist
from distrib_ft.runtime.loss import forward_logits
from distrib_ft.runtime.metrics import Progress

ESTIMATORS = ("empirical", "sampled", "batched")


def _sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of log p(label). logits (B, T, V), labels (B, T); labels are unshifted."""
    lp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    picked = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum()


def _sample_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Replace every target token by a draw from the model's distribution at that position.

    Only target positions are sampled: prompt and padding positions cost nothing.
    """
    tgt = labels[:, 1:]
    where = (tgt != -100).nonzero(as_tuple=True)
    probs = F.softmax(logits[:, :-1, :].detach()[where].float(), dim=-1)  # (n_targets, V)
    draws = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(labels.device)
    sampled = labels.clone()
    sampled[:, 1:][where] = draws
    return sampled


def compute_fisher(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], examples: list[dict],
                   collate_fn: Callable[[list[dict]], dict], *, estimator: str = "empirical",
                   batch_size: int = 8, seed: int = 0, device: torch.device | None = None,
                   progress: bool = True, sharded: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Diagonal Fisher of ``params`` over ``examples`` (the full list; each rank takes its shard).

    Args:
        model: the module to differentiate (DeepSpeed's ``engine.module``).
        params: name -> parameter to estimate F for (any parameters, trainable or not).
        examples: tokenized examples with ``input_ids`` and ``labels``.
        collate_fn: list of examples -> batch dict of (B, T) tensors.
        estimator: ``empirical`` | ``sampled`` | ``batched``.
        batch_size: sequences per backward for ``sampled`` and ``batched``.
        seed: seeds the per-rank generator of the ``sampled`` estimator's label draws (``seed * 1_000_003 + rank``).
        device: where batches and the accumulators live; default ``dist.device()``.
        progress: show a progress bar (main rank only).
        sharded: ZeRO-3: reduce each sum to the ranks that own its partitions (``reduce_scatter``) and return this
            rank's flat partitions only (distrib_ft/preservation/zero3.py) instead of full tensors on every rank.

    Returns:
        (F: name -> fp32 tensor with the parameter's full shape -- or, sharded, this rank's flat partition --,
        info: sequences, target_tokens, estimator).

    Raises:
        ValueError: ``estimator`` is not one of ``ESTIMATORS``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"ewc.estimator: {estimator!r} is not one of {', '.join(ESTIMATORS)}")
    rank, world = dist.rank(), dist.world_size()
    device = device or dist.device()
    names = list(params)
    tensors = [params[n] for n in names]
    shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in tensors]
    sums = [torch.zeros(s, dtype=torch.float32, device=device) for s in shapes]
    mine = list(range(rank, len(examples), world))
    per_pass = 1 if estimator == "empirical" else batch_size
    n_passes = math.ceil(math.ceil(len(examples) / world) / per_pass)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in tensors]
    for p in tensors:
        p.requires_grad_(True)
    count = tokens = 0.0
    bar = Progress(total=n_passes, initial=0, enabled=progress and dist.is_main(), desc=f"fisher ({estimator})")
    try:
        for i in range(n_passes):
            idx = mine[i * per_pass:(i + 1) * per_pass]
            weight = 1.0 if idx else 0.0
            batch = collate_fn([examples[j] for j in (idx or mine[:1] or [0])])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.enable_grad():
                logits = forward_logits(model, batch)
                labels = batch["labels"]
                if estimator == "sampled":
                    labels = _sample_labels(logits, labels, generator)
                n_targets = int((labels[:, 1:] != -100).sum())
                objective = _sequence_log_likelihood(logits, labels)
                if estimator == "batched":
                    objective = objective / max(n_targets, 1)
                grads = torch.autograd.grad(objective, tensors, allow_unused=True)
            for acc, g in zip(sums, grads):
                if g is not None and weight:
                    g = g.detach().float()
                    acc.addcmul_(g, g)
            if weight:
                count += 1 if estimator == "batched" else len(idx)
                tokens += n_targets
            bar.update(1)
    finally:
        for p, f in zip(tensors, flags):
            p.requires_grad_(f)
        model.train(was_training)
        bar.close()
    n_sequences = float(len(mine))
    count, tokens, n_sequences = dist.all_reduce_sum([count, tokens, n_sequences], device=device)
    if sharded:  # each owner keeps its slice of the sum over ranks; the full-size sums are dropped one by one
        from distrib_ft.preservation.zero3 import reduce_to_owner

        fisher = {}
        for i, (n, p) in enumerate(zip(names, tensors)):
            fisher[n] = reduce_to_owner(sums[i], p).div_(max(count, 1.0)).cpu()
            sums[i] = None
        return fisher, {"estimator": estimator, "sequences": int(n_sequences), "target_tokens": int(tokens)}
    for acc in sums:
        if torch_dist.is_initialized() and world > 1:
            torch_dist.all_reduce(acc, op=torch_dist.ReduceOp.SUM)
        acc.div_(max(count, 1.0))
    fisher = {n: acc.cpu() for n, acc in zip(names, sums)}
    return fisher, {"estimator": estimator, "sequences": int(n_sequences), "target_tokens": int(tokens)}


# --- the artifact ---------------------------------------------------------------------------------

ANCHOR_PREFIX = "anchor::"


def save_fisher(path: str | Path, fisher: dict[str, torch.Tensor], info: dict,
                anchors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a Fisher as safetensors: one fp32 tensor per parameter, keyed by its ``named_parameters()`` name.

    Anchors (theta*) under ``anchor::NAME``; metadata: estimator, sequences, target_tokens, model, and the rest
    of ``info``. Written to a temp file, then renamed.
    """
    import os
    import tempfile

    from safetensors.torch import save_file

    from distrib_ft.runtime.storage import plain_modes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().to(torch.float32).contiguous() for n, t in fisher.items()}
    for n, t in (anchors or {}).items():
        tensors[ANCHOR_PREFIX + n] = t.detach().to(torch.float32).contiguous()
    metadata = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in info.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        plain_modes(tmp)  # mkstemp's (and safetensors') 0600 would stay after the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_fisher(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(fisher, anchors, metadata) from a file written by :func:`save_fisher`."""
    from safetensors import safe_open

    from distrib_ft.runtime.storage import local_input

    path = Path(local_input(str(path)))  # a URL: downloaded once into the cache
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Fisher file not found (ewc.fisher_path)")
    fisher, anchors = {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for k in f.keys():
            (anchors if k.startswith(ANCHOR_PREFIX) else fisher)[k.removeprefix(ANCHOR_PREFIX)] = f.get_tensor(k)
    info = {}
    for k, v in meta.items():
        try:
            info[k] = json.loads(v)
        except json.JSONDecodeError:
            info[k] = v
    return fisher, anchors, info


def merge_online(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], gamma: float) -> dict[str, torch.Tensor]:
    """Online EWC (Schwarz et al. 2018): F <- gamma * F_old + F_new, per parameter."""
    if old.keys() != new.keys():
        missing = sorted(set(old) ^ set(new))[:3]
        raise ValueError(f"ewc.gamma: the previous Fisher and the new one cover different parameters (e.g. {missing})")
    return {n: gamma * old[n] + new[n] for n in new}
