"""A quadratic penalty's gradient added in place into DeepSpeed's gradient buffers, between backward and step.

For a penalty ``coef/2 * sum_i F_i (theta_i - theta*_i)^2`` (EWC: coef = lambda; L2-SP: F = 1) the gradient is
``coef * F (theta - theta*)``. Instead of a tensor per parameter that autograd then adds to the step's gradient
(``ewc.through_gradients``: about 4 passes over memory per parameter), :func:`add_penalty_` adds it straight into
the buffer that DeepSpeed's ``step()`` reads, a chunk at a time (``CHUNK`` elements, so ``theta - theta*`` stays in
the CPU cache): 4 reads (theta, theta*, F, the gradient) and 1 write per element, the floor for this update.

Where the gradient lives after the optimizer step's last ``engine.backward`` (the gradient accumulation boundary)
and before ``engine.step()`` -- the window in which DeepSpeed's own ``safe_get_full_grad`` / ``safe_set_full_grad``
read and write gradients (https://deepspeed.readthedocs.io/en/latest/zero3.html "Debugging", "Modifying
Partitioned States"; ``deepspeed/utils/tensor_fragment.py``) -- is found by :func:`grad_slices`:

- ZeRO-0 (the engine wraps no ZeRO optimizer): ``p.grad``, already averaged over ranks (DeepSpeed all-reduces at
  the boundary's backward); clipping (``engine.step()``) and the loop's gradient norm come after.
- ZeRO-1/2 (``DeepSpeedZeroOptimizer``, no CPU offload): the part of ``p`` this rank's partition holds, in
  ``optimizer.averaged_gradients`` (reduced and averaged; ``p._hp_mapping.get_lp_grad_fragment``), with the
  optimizer's fp32 master values of that part (``p._hp_mapping.hp_fragment``) as theta. ``step()`` then computes
  the gradient norm, clips and updates from these buffers, so norm and clipping see the penalty as before.

The buffers hold unscaled gradients: fp16 and its loss scale are refused by distrib_ft/runtime/engine.py.
Anything else (ZeRO-3: ``preservation/zero3.py``; CPU offload; DeepSpeed's ``BF16_Optimizer``) returns None: the
caller keeps the autograd path. Exactness is tested against autograd of the scalar penalty
(tests/integration/test_ewc_grads.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 1 << 16  # elements per chunk: 256 KiB of fp32 for theta - theta*, well inside L2 (bench/ewc_cost.py)


@dataclass
class GradSlice:
    """Where one parameter's gradient (or this rank's part of it) is: flat views, and the part's place in ``p``."""

    name: str
    grad: torch.Tensor  # flat view into the buffer DeepSpeed's step() reads
    theta: torch.Tensor  # flat, the current values of the same elements (fp32 where DeepSpeed keeps a master copy)
    start: int  # offset of the part in the flattened parameter
    numel: int


def grad_slices(params: dict[str, torch.nn.Parameter]) -> list[GradSlice] | None:
    """The gradient buffers of ``params`` right after the boundary's backward, or None for a layout not handled.

    Call it between the optimizer step's last ``engine.backward`` and ``engine.step()`` (the buffers are rebuilt
    every step). ZeRO-0: a trained parameter that received no gradient gets a zero one (as the penalty's autograd
    would give it).
    """
    ps = list(params.items())
    if not ps or any(hasattr(p, "ds_id") for _, p in ps):  # ZeRO-3: sharded separately (zero3.py)
        return None
    if not any(hasattr(p, "_hp_mapping") for _, p in ps):  # ZeRO-0: whole gradients in p.grad
        out = []
        for n, p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if not p.grad.is_contiguous():
                return None
            out.append(GradSlice(n, p.grad.view(-1), p.detach().view(-1), 0, p.numel()))
        return out
    out = []
    for n, p in ps:
        m = getattr(p, "_hp_mapping", None)
        if m is None:  # none of p in this rank's partition
            continue
        if not _zero_1_2(m):
            return None
        grad = m.get_lp_grad_fragment(p._index_in_param_group)
        addr = m.lp_fragment_address
        if grad.numel() != addr.numel or not grad.is_contiguous() or m.hp_fragment.numel() != addr.numel:
            raise RuntimeError(f"{n}: DeepSpeed's gradient partition has {grad.numel()} elements, its fragment "
                               f"{addr.numel}: a ZeRO-1/2 layout this penalty does not know (set "
                               "EWC.in_place = False)")
        out.append(GradSlice(n, grad.view(-1), m.hp_fragment.detach().view(-1), int(addr.start), int(addr.numel)))
    return out


@torch.no_grad()
def add_penalty_(slices: list[GradSlice], anchors: dict[str, torch.Tensor], coef: float,
                 fisher: dict[str, torch.Tensor] | None = None, *, value: bool = False) -> torch.Tensor | None:
    """``grad += coef * F (theta - theta*)`` in place for every slice; F = 1 when ``fisher`` is None.

    ``anchors`` and ``fisher`` are full tensors by name (each slice reads its part). With ``value``: returns this
    rank's ``coef/2 * sum F (theta - theta*)^2`` over the slices (fp64 0-dim tensor), at the cost of one more
    in-cache multiply and a dot product per chunk; else None.
    """
    if not slices:
        return torch.zeros((), dtype=torch.float64) if value else None
    device = slices[0].grad.device
    buf = torch.empty(CHUNK, dtype=torch.float32, device=device)
    fbuf = torch.empty(CHUNK, dtype=torch.float32, device=device) if value else None
    total = torch.zeros((), dtype=torch.float64, device=device) if value else None
    for s in slices:
        anchor = anchors[s.name].view(-1)[s.start:s.start + s.numel]
        f = fisher[s.name].view(-1)[s.start:s.start + s.numel] if fisher is not None else None
        for i in range(0, s.numel, CHUNK):
            j = min(i + CHUNK, s.numel)
            d = buf[:j - i]
            torch.sub(s.theta[i:j], anchor[i:j], out=d)
            g = s.grad[i:j]
            if value:
                fd = fbuf[:j - i]
                if f is None:
                    fd.copy_(d)
                else:
                    torch.mul(d, f[i:j], out=fd)
                total += torch.dot(fd, d)
                g.add_(fd, alpha=coef)
            elif f is None:
                g.add_(d, alpha=coef)
            else:
                g.addcmul_(d, f[i:j], value=coef)
    return total * (0.5 * coef) if value else None


def supports(params: dict[str, torch.nn.Parameter]) -> bool:
    """Whether :func:`grad_slices` handles these parameters' layout (known once the engine is built).

    ZeRO-0, or ZeRO-1/2's ``DeepSpeedZeroOptimizer`` without CPU offload (its ``averaged_gradients`` hold one
    tensor per parameter part).
    """
    ps = list(params.values())
    if not ps or any(hasattr(p, "ds_id") for p in ps):
        return False
    if not any(hasattr(p, "_hp_mapping") for p in ps):
        return True
    mapped = [p._hp_mapping for p in ps if getattr(p, "_hp_mapping", None) is not None]
    return bool(mapped) and all(_zero_1_2(m) for m in mapped)


def _zero_1_2(mapping) -> bool:
    """Whether DeepSpeed's lp-to-hp mapping of a parameter is ZeRO-1/2's without CPU offload.

    ``DeepSpeedZeroOptimizer`` links every parameter with its (possibly empty) ``offload_gradient_dict``;
    ``BF16_Optimizer`` (bf16 with fp32 gradient accumulation under ZeRO-1: full-size fp32 gradient buffers) with
    None (deepspeed/runtime/zero/stage_1_and_2.py and bf16_optimizer.py, ``_link_all_hp_params``).
    """
    return not mapping.use_offload and mapping.offload_gradient_dict is not None


def partitioned(params: dict[str, torch.nn.Parameter]) -> bool:
    """Whether each rank holds part of the gradients (ZeRO-1/2): a value summed over slices needs an all-reduce."""
    return any(hasattr(p, "_hp_mapping") for p in params.values())
