"""L2-SP: an L2 pull of the trained parameters toward their values at the start of the job.

Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks"
(ICML 2018): ``loss + alpha/2 * sum_i (theta_i - theta0_i)^2``. It is EWC with F = 1 -- no Fisher pass, no
old data -- so it protects every direction equally, the important and the unimportant ones. The anchors
theta0 are the trained parameters' fp32 values when the job starts (with a LoRA adapter: the fresh
adapter, so it acts as a weight decay toward the adapter's initialisation, B = 0), saved in
``output_dir/l2_sp_anchors.safetensors`` so that a resumed job pulls toward the same point.

Supported: ZeRO 0, 1, 2; ZeRO-3 only when the trained parameters stay whole on every rank (like EWC's penalty).
The penalty enters through the gradients like EWC's (``distrib_ft.preservation.ewc.through_gradients``): its
backward returns alpha (theta - theta0); the value is computed on logging steps only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from distrib_ft.preservation.ewc import through_gradients
from distrib_ft.runtime import dist
from distrib_ft.runtime.storage import plain_modes
from distrib_ft.schema import Strict

ANCHORS_FILE = "l2_sp_anchors.safetensors"


class L2SPConfig(Strict):
    """``l2_sp:``: an L2 pull toward the weights the job starts from (Li et al. 2018; EWC with F = 1)."""

    alpha: float = Field(0.0, ge=0, description=(
        "Penalty weight: alpha/2 * sum (theta - theta0)^2 over the trained parameters; 0 = off."))

    @property
    def enabled(self) -> bool:
        return self.alpha > 0


class L2SP:
    name: ClassVar[str] = "l2_sp"
    config_class: ClassVar[type[Strict]] = L2SPConfig
    through_grads: ClassVar[bool] = True  # False: autograd of the scalar penalty (the reference)

    def __init__(self, config: L2SPConfig, ctx):
        self.alpha, self.ctx = config.alpha, ctx
        self.anchors: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._sum, self._steps = 0.0, 0

    def check(self, *, zero_stage: int, model: torch.nn.Module, method=None) -> None:
        trained = [p for p in model.parameters() if p.requires_grad]
        if zero_stage == 3 and any(hasattr(p, "ds_id") and not getattr(p, "ds_persist", False) for p in trained):
            raise ValueError("l2_sp.alpha: under ZeRO-3 the penalty needs the trained parameters whole on every rank "
                             "(LoRA matrices below stage3_param_persistence_threshold); use ds_configs/zero2.json")

    def on_task_start(self, model: torch.nn.Module, *, resumed: bool) -> None:
        from distrib_ft.runtime.checkpoint import gather_full_state_dict

        file = Path(self.ctx.output_dir) / ANCHORS_FILE
        if resumed and file.exists():  # the start of the original run, not the resumed weights
            self.anchors = load_file(str(file))
        else:
            self.anchors = gather_full_state_dict(model, trainable_only=True)
            if dist.is_main():
                tmp = file.with_name(f".{file.name}.tmp")
                save_file(self.anchors, str(tmp))
                plain_modes(tmp)  # safetensors writes 0600
                tmp.replace(file)
            dist.barrier()
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.anchors = {n: self.anchors[n].to(dist.device()) for n in self._params}

    def penalty(self, model: torch.nn.Module, *, logging: bool = True) -> torch.Tensor:
        """alpha/2 * sum_i (theta_i - theta0_i)^2 over the trained parameters (fp32, a scalar).

        Like EWC's (``EWC.through_grads``): its backward adds alpha (theta - theta0) straight to the gradients, the
        value is computed only when ``logging`` (else 0); ``through_grads = False``: autograd of the scalar.
        """
        if not self.through_grads:
            value = 0.5 * self.alpha * torch.stack(
                [(p.float() - self.anchors[n]).pow(2).sum() for n, p in self._params.items()]).sum()
            self._sum += value.item()
            self._steps += 1
            return value
        value = None
        if logging:
            with torch.no_grad():
                diffs = torch._foreach_sub([p.detach().float() for p in self._params.values()],
                                           [self.anchors[n] for n in self._params])
                value = 0.5 * self.alpha * torch.stack([(d * d).sum() for d in diffs]).sum()
            self._sum += float(value)
            self._steps += 1
        return through_gradients(value, self._grads, list(self._params.values()))

    @torch.no_grad()
    def _grads(self, g: torch.Tensor) -> list[torch.Tensor]:
        params = list(self._params.values())
        diffs = torch._foreach_sub([p.detach().float() for p in params], [self.anchors[n] for n in self._params])
        torch._foreach_mul_(diffs, g.float() * self.alpha)
        return [d.to(p.dtype) for d, p in zip(diffs, params)]

    def metrics(self) -> dict:
        """``l2_sp_penalty``: the mean penalty per optimizer step since the last line."""
        if not self._steps:
            return {}
        out = {"l2_sp_penalty": self._sum / self._steps}
        self._sum, self._steps = 0.0, 0
        return out
