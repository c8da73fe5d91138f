"""EWC's state sharded like ZeRO-3's parameters: each rank keeps the Fisher and the anchors of its own partition.

DeepSpeed ZeRO-3 (https://deepspeed.readthedocs.io/en/latest/zero3.html) splits every parameter's flattened
values into ``world`` equal partitions (the last one zero-padded): rank r owns elements
``[r * part, (r + 1) * part)`` of the flat tensor, ``part = ceil(numel / world)`` (``param.ds_tensor.ds_numel``),
and its optimizer keeps the fp32 master copy and the fp32 gradient of that partition only. This module holds:

- the pure slicing of a full tensor into the partition a rank owns and back (:func:`take_partition`,
  :func:`join_partitions`): a Fisher file holds full tensors by name whatever the world size (gather on write,
  scatter on read);
- the collectives: squared-gradient sums reduced to their owners (``reduce_scatter``, each owner keeps its slice),
  and the gather of partitions for a file;
- the penalty on the local partitions through DeepSpeed's local API (``deepspeed.utils.safe_get_local_fp32_param``,
  ``safe_get_local_grad`` / ``safe_set_local_grad``; https://deepspeed.readthedocs.io/en/latest/zero3.html
  "Modifying Partitioned States"): lambda F (theta - theta*) is added to the fp32 gradient partitions right before
  the ZeRO-3 optimizer's ``step()`` (after the last micro-batch's backward has reduced and partitioned the
  gradients), so the gradient norm, clipping and the optimizer see it exactly as the autograd penalty of ZeRO 0-2.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist


def partition_size(numel: int, world: int) -> int:
    """Elements per rank of a tensor of ``numel`` elements split ZeRO-3's way (the last partition padded)."""
    return math.ceil(numel / world) if numel else 0


def take_partition(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The flat partition of ``full`` that ``rank`` of ``world`` owns, zero-padded to :func:`partition_size`."""
    flat = full.reshape(-1)
    part = partition_size(flat.numel(), world)
    start, stop = min(rank * part, flat.numel()), min((rank + 1) * part, flat.numel())
    out = flat.new_zeros(part)
    out[:stop - start] = flat[start:stop]
    return out


def join_partitions(parts: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The full tensor of ``shape`` from every rank's partition, in rank order (the padding dropped)."""
    numel = math.prod(shape)
    return torch.cat([p.reshape(-1) for p in parts])[:numel].reshape(shape)


def is_sharded(params: dict[str, torch.nn.Parameter]) -> bool:
    """Whether ZeRO-3 partitions some of ``params`` between forwards (not kept whole by the persistence threshold)."""
    return any(hasattr(p, "ds_id") and not getattr(p, "ds_persist", False) for p in params.values())


def _group(p: torch.nn.Parameter):
    return getattr(p, "ds_process_group", None)


def owner(p: torch.nn.Parameter) -> tuple[int, int]:
    """(this rank, world) in the group ZeRO-3 partitions ``p`` over."""
    if not torch_dist.is_initialized():
        return 0, 1
    g = _group(p)
    return torch_dist.get_rank(group=g), torch_dist.get_world_size(group=g)


def local_size(p: torch.nn.Parameter) -> int:
    """Elements of this rank's partition of ``p``."""
    return int(p.ds_tensor.ds_numel) if hasattr(p, "ds_tensor") else partition_size(p.numel(), owner(p)[1])


def reduce_to_owner(full_sum: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    """Sum ``full_sum`` (this rank's full-shape sum for ``p``) over ranks; return this rank's partition of the sum.

    One ``reduce_scatter``: each rank receives only the slice it owns.
    """
    rank, world = owner(p)
    part = local_size(p)
    if world == 1:
        return take_partition(full_sum, 0, 1)
    flat = full_sum.reshape(-1)
    padded = flat.new_zeros(part * world)
    padded[:flat.numel()] = flat
    out = flat.new_zeros(part)
    torch_dist.reduce_scatter_tensor(out, padded, op=torch_dist.ReduceOp.SUM, group=_group(p))
    return out


def scatter(full: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """This rank's partitions of full tensors (read from a file), by name."""
    out = {}
    for n, t in full.items():
        rank, world = owner(params[n])
        out[n] = take_partition(t.float(), rank, world).contiguous()
    return out


def gather(local: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], *, keep: bool) -> dict:
    """Full tensors (CPU, fp32) from every rank's partitions, by name (collective).

    ``keep=False``: {} (the ranks that do not write), each full tensor dropped as soon as it is built.
    """
    out = {}
    for n in sorted(local):
        p = params[n]
        rank, world = owner(p)
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if world == 1:
            full = join_partitions([local[n]], shape)
        else:
            parts = [torch.empty_like(local[n]) for _ in range(world)]
            torch_dist.all_gather(parts, local[n].contiguous(), group=_group(p))
            full = join_partitions(parts, shape)
        if keep:
            out[n] = full.detach().to("cpu", torch.float32)
    return out


def local_fp32(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's fp32 master partition of a trainable ZeRO-3 parameter (the optimizer's copy, padded)."""
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(p)


def anchors(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """theta*: a copy of every parameter's fp32 master partition."""
    return {n: local_fp32(p).detach().float().clone() for n, p in params.items()}


def nbytes(*states: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors of ``states`` take."""
    return sum(t.numel() * t.element_size() for s in states for t in s.values())


class ShardedPenalty:
    """lambda/2 * sum F (theta - theta*)^2 over this rank's partitions, its gradient added before each optimizer step.

    Installed on the ZeRO-3 optimizer (``param._z3_optimizer``, the engine's optimizer) by wrapping its ``step``:
    the training loop is unchanged. The value of every step is kept for logging; :meth:`take_mean` sums it over
    ranks (one all-reduce per logged window, on every rank).
    """

    def __init__(self, lam: float, fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor],
                 params: dict[str, torch.nn.Parameter]):
        self.lam, self.fisher, self.anchors, self.params = lam, fisher, anchors, params
        self.sum, self.steps = 0.0, 0

    def install(self) -> None:
        opt = next(iter(self.params.values()))._z3_optimizer
        if getattr(opt, "_ewc_penalty", None) is not None:  # a second start in this process: replace the state
            opt._ewc_penalty = self
            return
        opt._ewc_penalty = self
        inner = opt.step

        def step(*args, **kwargs):
            opt._ewc_penalty.add_to_grads(getattr(opt, "loss_scale", 1.0))
            return inner(*args, **kwargs)

        opt.step = step

    @torch.no_grad()
    def add_to_grads(self, loss_scale: float = 1.0) -> float:
        """Add lambda F (theta - theta*) (times the loss scale) to each local fp32 gradient partition.

        Returns this rank's share of the penalty.
        """
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        value = 0.0
        for n, p in self.params.items():
            diff = local_fp32(p).float() - self.anchors[n]
            fd = self.fisher[n] * diff
            value += 0.5 * self.lam * float((fd * diff).sum())
            grad = safe_get_local_grad(p)
            safe_set_local_grad(p, grad + (self.lam * loss_scale) * fd.to(grad.dtype))
        self.sum += value
        self.steps += 1
        return value

    def take_mean(self, device) -> float | None:
        """The mean penalty per step since the last call, summed over ranks (collective); None before any step."""
        if not self.steps:
            return None
        total = torch.tensor([self.sum], dtype=torch.float64, device=device)
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
        mean = float(total) / self.steps
        self.sum, self.steps = 0.0, 0
        return mean
