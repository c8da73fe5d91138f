"""EMA: an exponential moving average of the trained weights, which the job evaluates and exports.

Polyak and Juditsky, "Acceleration of Stochastic Approximation by Averaging" (SIAM J. Control Optim. 1992),
in the exponential form of timm's ``ModelEmaV2`` (timm/utils/model_ema.py): after every ``update_every``-th
optimizer step ``ema = decay * ema + (1 - decay) * theta`` over the trained parameters, kept in fp32 on every
rank, starting from their values when the job starts (step 0: EMA = start weights). The average moves slowly
away from the start, so it trades some of the new task's gain for less forgetting, with no extra forward
or backward pass.

What the job does with it: every evaluation (step 0 included) runs with the EMA in the module and the
training weights put back after, so the forgetting budget gates the model that is exported; final/ (and
rejected/) hold the EMA; the monitor's rollback restores the chosen checkpoint's EMA. The EMA is read from
the module's parameters (bf16 when ``training.bf16``: the weights the model computes with), not from the
optimizer's fp32 master copy; for export the master copy is set to the EMA while final/ is written (it is
what ``checkpoint.export_final`` reads), then set back.

Checkpoints: the EMA tensors travel in DeepSpeed's ``client_state`` (``"tensors"``: saved with the model
states, so they are in every checkpoint before its COMPLETE marker and restored on resume and rollback; the
defence's ``state_dict`` stays JSON). Exact resume: the resumed run's final/ is bit-equal to the
uninterrupted run's.

Supported: ZeRO 0, 1, 2 (every rank holds the whole trained parameters); ZeRO-3 only when they stay whole
on every rank (LoRA matrices below ``stage3_param_persistence_threshold``), as for L2-SP.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from pydantic import Field

from distrib_ft.runtime import dist
from distrib_ft.schema import Strict


class EMAConfig(Strict):
    """``ema:``: export an exponential moving average of the trained weights (Polyak and Juditsky 1992)."""

    decay: float = Field(0.0, ge=0, lt=1, description=(
        "ema = decay * ema + (1 - decay) * theta after every update_every-th optimizer step, from the start "
        "weights; the EMA is what the monitor evaluates and what final/ holds. 0 = off; e.g. 0.999 "
        "(averages over about 1 / (1 - decay) updates)."))
    update_every: int = Field(1, ge=1, description=(
        "Update the EMA after every N-th optimizer step (the decay applies per update)."))

    @property
    def enabled(self) -> bool:
        return self.decay > 0


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """In place, ``ema = decay * ema + (1 - decay) * param`` for each pair (ema fp32, param in any dtype)."""
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)


class EMA:
    name: ClassVar[str] = "ema"
    config_class: ClassVar[type[Strict]] = EMAConfig

    def __init__(self, config: EMAConfig, ctx):
        self.decay, self.update_every, self.ctx = config.decay, config.update_every, ctx
        self.shadow: dict[str, torch.Tensor] = {}  # fp32, on this rank's device
        self._params: dict[str, torch.nn.Parameter] = {}
        self._loaded: dict[str, torch.Tensor] | None = None  # from a checkpoint, before on_task_start
        self.updates = 0

    def check(self, *, zero_stage: int, model: torch.nn.Module, method=None) -> None:
        trained = [p for p in model.parameters() if p.requires_grad]
        if zero_stage == 3 and any(hasattr(p, "ds_id") and not getattr(p, "ds_persist", False) for p in trained):
            raise ValueError("ema.decay: under ZeRO-3 the EMA needs the trained parameters whole on every rank "
                             "(LoRA matrices below stage3_param_persistence_threshold); use ds_configs/zero2.json")

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """A checkpoint's EMA (resume, or the monitor's rollback in finish)."""
        if not tensors:
            return
        if self._params:  # rollback: the loop is set up
            missing = self._params.keys() - tensors.keys()
            if missing:
                raise ValueError(f"ema: the checkpoint's EMA lacks {sorted(missing)[:3]}; resume without ema.decay "
                                 "or from a checkpoint written with it")
            with torch.no_grad():
                for n, e in self.shadow.items():
                    e.copy_(tensors[n])
        else:
            self._loaded = tensors

    def on_task_start(self, model: torch.nn.Module, *, resumed: bool) -> None:
        from distrib_ft.runtime.checkpoint import gather_full_state_dict

        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # the start: the fp32 values (ZeRO-3 fetches its persistent parameters at the first forward only)
        source = self._loaded if self._loaded is not None else gather_full_state_dict(model, trainable_only=True)
        if self._loaded is not None and (missing := self._params.keys() - self._loaded.keys()):
            raise ValueError(f"ema: the checkpoint's EMA lacks {sorted(missing)[:3]}; resume without ema.decay "
                             "or from a checkpoint written with it")
        self.shadow = {n: source[n].to(dist.device(), torch.float32, copy=True) for n in self._params}
        self._loaded = None

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        if step % self.update_every == 0:
            names = list(self._params)
            ema_update([self.shadow[n] for n in names], [_value(self._params[n]) for n in names], self.decay)
            self.updates += 1

    @contextlib.contextmanager
    def exported_weights(self, model: torch.nn.Module, *, master: bool = False):
        """The module holds the EMA inside; the training weights are put back after, bit-equal.

        ``master``: also the optimizer's fp32 master copy (what export reads). Collective then (ZeRO 1-2 gather
        the master copy with an all-reduce per parameter).
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        kept = {n: p.detach().clone() for n, p in self._params.items() if _whole(p)}
        masters = {}
        if master:
            for n, p in self._params.items():
                full = safe_get_full_fp32_param(p)
                if full is not None:
                    masters[n] = full.clone()
                    safe_set_full_fp32_param(p, self.shadow[n].to(full.device))
        # A ZeRO-3 parameter that is not whole has not been fetched yet (before the first forward): then it is
        # still at the start, as is the EMA (no update yet); its master copy gives the forward's weights.
        whole = {n: p for n, p in self._params.items() if _whole(p)}
        if len(whole) < len(self._params) and self.updates:
            raise RuntimeError("ema: a ZeRO-3 trained parameter is partitioned after training steps")
        with torch.no_grad():
            for n, p in whole.items():
                p.data.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in whole.items():
                    p.data.copy_(kept[n])
            for n, full in masters.items():
                safe_set_full_fp32_param(self._params[n], full)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The EMA for the checkpoint (on CPU)."""
        return {n: e.detach().cpu() for n, e in self.shadow.items()}

    def summary(self) -> dict:
        return {"ema": {"decay": self.decay, "update_every": self.update_every, "updates": self.updates}}


def _whole(p: torch.nn.Parameter) -> bool:
    """Whether the module holds the whole parameter (not a ZeRO-3 partition not yet fetched)."""
    return not hasattr(p, "ds_id") or p.data.numel() == p.ds_numel


def _value(p: torch.nn.Parameter) -> torch.Tensor:
    """The parameter as the model computes with it; a ZeRO-3 one not fetched: its fp32 master (collective)."""
    if _whole(p):
        return p.detach()
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p)
