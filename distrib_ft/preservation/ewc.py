"""Elastic Weight Consolidation, distributed-correct: loss + lambda/2 * sum_i F_i (theta_i - theta*_i)^2.

Two targets (``ewc.target``):

``trainable``    F over the parameters the job trains, anchored at theta* = their values at the start of
                 the job, or the anchors stored with a Fisher file (``fisher_path``) (a previous round's final weights).
                 For full / partial fine-tuning, and for EWC on a LoRA adapter that keeps training.
``lora_merged``  EWC-LoRA: each round trains a *fresh* adapter on top of the earlier rounds' adapters,
                 merged into the base (``method.merge_adapters``). F is over the dense weights W that the
                 adapters update (computed at the merged point), the anchor is the merged model the round
                 starts from, so theta - theta* is exactly this round's update dW = B @ A * scale and the
                 penalty is lambda/2 * sum F_W * dW^2. A fresh adapter's own values are no anchor (B = 0, A random).

Supported: ZeRO 0, 1, 2 for both targets. ZeRO-3: target=trainable with parameters that ZeRO-3 partitions
(full-parameter EWC) is sharded (distrib_ft/preservation/zero3.py): each rank keeps F and theta* of its own
partition of every parameter, the penalty reads the optimizer's fp32 master partition and its gradient
lambda F (theta - theta*) is added to the fp32 gradient partitions before the optimizer step; a Fisher file
holds full tensors whatever the world size (gathered on write, scattered on read). Otherwise (ZeRO 0-2, or
parameters whole on every rank: LoRA matrices below ``stage3_param_persistence_threshold``) the penalty enters
through the gradients: an autograd.Function (https://pytorch.org/docs/stable/notes/extending.html) whose backward
returns the closed form lambda F (theta - theta*) (lora_merged: its chain rule to A and B), so DeepSpeed's hooks,
averaging, gradient norm and clipping see it as before, without autograd of the scalar (issue 13; ~2x cheaper,
bench/ewc_cost.py --parts grads); its value is computed on logging steps only. target=trainable under ZeRO 0-2
goes one step further (``in_place``, the default): lambda F (theta - theta*) is added in place into DeepSpeed's
gradient buffers after the step's last backward (``p.grad``; ZeRO-1/2: this rank's averaged gradient partitions,
theta from the fp32 master copy; distrib_ft/preservation/grad_buffers.py), before the gradient norm and clipping.
target=lora_merged needs the LoRA matrices whole. Under bf16 the autograd.Function reads the module's bf16 copy of
theta; F and theta* are fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import ConfigDict, Field

from distrib_ft.data.formats import collate
from distrib_ft.preservation import grad_buffers, zero3
from distrib_ft.preservation.fisher import compute_fisher, load_fisher, merge_online, save_fisher
from distrib_ft.runtime import dist
from distrib_ft.schema import DataFormat, InputPath, Strict

STATE_FILE = "ewc_state.safetensors"
FINAL_FILE = "fisher.safetensors"


class EWCConfig(Strict):
    """``ewc:``: Elastic Weight Consolidation, lambda/2 * sum_i F_i (theta_i - theta*_i)^2.

    Kirkpatrick et al. 2017; the Fisher estimators are in distrib_ft/preservation/fisher.py.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    lambda_: float = Field(0.0, alias="lambda", ge=0, description=(
        "Penalty weight; 0 = no penalty. It does not transfer between estimators (their scales differ ~100x)."))
    estimator: Literal["empirical", "sampled", "batched"] = Field(
        "empirical", description=(
            "empirical (per-sequence, data labels), sampled (true Fisher), batched (biased; comparison only)."))
    target: Literal["trainable", "lora_merged"] = Field("trainable", description=(
        "trainable: F over the parameters being trained, anchored at their start values (full / partial "
        "fine-tuning, or EWC on the adapter itself). lora_merged: F over the dense weights that the LoRA "
        "adapters update, penalty on this round's merged update B@A*scale (EWC-LoRA); the anchor is the "
        "merged model this round starts from."))
    fisher_path: InputPath | None = Field(None, description=(
        "A precomputed Fisher file (safetensors, with its anchors): `distrib-ft fisher`, or "
        "final/fisher.safetensors of an earlier round."))
    fisher_data_files: list[InputPath] = Field(default_factory=list, description=(
        "Data of the skills to keep: the Fisher is computed on them at the start of the job."))
    fisher_data_format: DataFormat | None = Field(None, description="Format of fisher_data_files; default data.format.")
    fisher_max_sequences: int = Field(512, ge=1, description=(
        "At most this many sequences (a uniform sample) enter a Fisher pass."))
    fisher_batch_size: int = Field(8, ge=1, description=(
        "Sequences per backward for the sampled and batched estimators."))
    update_after: bool = Field(False, description=(
        "After the job: compute F on the data just learned and write final/fisher.safetensors (merged online "
        "with the starting F: F <- gamma*F_old + F_new) for the next round."))
    gamma: float = Field(1.0, ge=0, le=1, description=(
        "Online EWC decay of the previous rounds' Fisher (Schwarz et al. 2018)."))

    @property
    def enabled(self) -> bool:
        return self.lambda_ > 0 or self.update_after

    def check_job(self, job) -> None:
        """Cross-checks with the rest of the job (ValueError naming the key)."""
        from distrib_ft.methods import build_method

        method = build_method(job.method)
        if self.lambda_ > 0 and not (self.fisher_path or self.fisher_data_files):
            raise ValueError("ewc.lambda: > 0 needs ewc.fisher_path or ewc.fisher_data_files (the data of the skills "
                             "to keep)")
        if self.fisher_path and self.fisher_data_files:
            raise ValueError("ewc.fisher_path: give either a precomputed fisher_path or fisher_data_files, not both")
        if self.target == "lora_merged" and not method.merged_update:
            raise ValueError(f"ewc.target: lora_merged needs a method whose update is a merged low-rank product "
                             f"(method.type=lora without use_dora); this job's is {job.method.type}")
        if self.target == "trainable" and method.new_parameters and self.fisher_path:
            raise ValueError(f"ewc.fisher_path: method {job.method.type} trains fresh parameters, so the anchors "
                             "of an earlier round do not apply; use ewc.target=lora_merged with method.merge_adapters")
        if self.update_after and job.data.streaming:
            raise ValueError("ewc.update_after: not supported with data.streaming (list ewc.fisher_data_files instead)")


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every peft LoRA layer with an adapter."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
            and len(m.lora_A)]


def lora_delta(m: torch.nn.Module) -> torch.Tensor:
    """The dense update B @ A * scale of a LoRA layer's active adapter, in W's layout, fp32."""
    a = m.active_adapters[0]
    delta = (m.lora_B[a].weight.float() @ m.lora_A[a].weight.float()) * m.scaling[a]
    return delta.T if getattr(m, "fan_in_fan_out", False) else delta


class EWC:
    """The EWC defence.

    ``ctx`` (a ``distrib_ft.preservation.Context``) may be None for the penalty and the Fisher maths alone (tests,
    benchmarks).
    """

    name: ClassVar[str] = "ewc"
    config_class: ClassVar[type[Strict]] = EWCConfig
    through_grads: ClassVar[bool] = True  # False: autograd of the scalar penalty (the reference in tests and bench)
    in_place: ClassVar[bool] = True  # target=trainable, ZeRO 0-2: added into the gradient buffers (add_to_grads)

    def __init__(self, config: EWCConfig, ctx=None):
        self.config, self.ctx = config, ctx
        self.lam, self.estimator, self.target = config.lambda_, config.estimator, config.target
        self.seed = ctx.seed if ctx else 0
        self.pad_token_id = ctx.tokenizer.pad_token_id if ctx else 0
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchors: dict[str, torch.Tensor] = {}
        self.info: dict = {}
        self._penalty_sum, self._penalty_steps = 0.0, 0
        self.sharded = False  # ZeRO-3 partitions: self.fisher / self.anchors hold this rank's flat partitions
        self._sharded_penalty: zero3.ShardedPenalty | None = None
        self._in_place = False  # the gradient is added by add_to_grads, penalty() returns None

    @staticmethod
    def preflight(config: EWCConfig, job, tokenizer) -> None:
        """On the driver: the first records of ``fisher_data_files`` (DataError naming the file and line)."""
        from distrib_ft.data.check import check_files

        if config.fisher_data_files:
            d = job.data
            check_files(config.fisher_data_files, config.fisher_data_format or d.format, key="ewc.fisher_data_files",
                        tokenizer=tokenizer, max_seq_length=d.max_seq_length, prompt_template=d.prompt_template,
                        text_field=d.text_field)

    def fisher_examples(self) -> list[dict]:
        """A uniform sample (``fisher_max_sequences``) of ``fisher_data_files``, tokenized like the job's data."""
        from distrib_ft.data.formats import build_dataset

        c, d = self.config, self.ctx.data
        ds, _ = dist.main_first(lambda: build_dataset(
            c.fisher_data_files, fmt=c.fisher_data_format or d.format, tokenizer=self.ctx.tokenizer,
            max_seq_length=d.max_seq_length, prompt_template=d.prompt_template, text_field=d.text_field))
        return [ds[i] for i in _sample(len(ds), c.fisher_max_sequences, self.seed)]

    # --- which parameters ---------------------------------------------------------------------------
    def fisher_params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The parameters F is over, by their ``named_parameters()`` names."""
        if self.target == "trainable":
            return {n: p for n, p in model.named_parameters() if p.requires_grad}
        return {f"{n}.base_layer.weight": m.base_layer.weight for n, m in lora_layers(model)}

    def is_sharded(self, model: torch.nn.Module) -> bool:
        """Whether F and theta* are kept per partition: target=trainable with parameters ZeRO-3 partitions."""
        return self.target == "trainable" and zero3.is_sharded(self.fisher_params(model))

    def check(self, *, zero_stage: int, model: torch.nn.Module, method=None) -> None:
        if self.target == "lora_merged" and not lora_layers(model):
            raise ValueError("ewc.target: lora_merged, but the model has no LoRA layers")
        if zero_stage != 3 or self.lam == 0 or self.target == "trainable":  # trainable: sharded under ZeRO-3
            return
        read = [p for _, m in lora_layers(model) for p in (*m.lora_A.parameters(), *m.lora_B.parameters())]
        if any(hasattr(p, "ds_id") and not getattr(p, "ds_persist", False) for p in read):
            raise ValueError("ewc.target: lora_merged under ZeRO-3 needs the LoRA matrices whole on every rank "
                             "(below zero_optimization.stage3_param_persistence_threshold): raise the threshold, or "
                             "use ds_configs/zero2.json")

    # --- hooks ------------------------------------------------------------------------------------
    def compute(self, model: torch.nn.Module, examples: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
        """F over :meth:`fisher_params` (collective): full tensors, or this rank's partitions when sharded."""
        fisher, info = compute_fisher(model, self.fisher_params(model), examples,
                                      lambda b: collate(b, self.pad_token_id), estimator=self.estimator,
                                      batch_size=self.config.fisher_batch_size, seed=self.seed,
                                      sharded=self.is_sharded(model))
        return fisher, {**info, "model": self.ctx.model_name if self.ctx else "", "target": self.target}

    def current_anchors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """theta* for target=trainable: the fp32 values of the trained parameters (collective).

        Sharded: this rank's fp32 master partitions.
        """
        if self.target != "trainable":
            return {}
        if self.is_sharded(model):
            return zero3.anchors(self.fisher_params(model))
        from distrib_ft.runtime.checkpoint import gather_full_state_dict

        return gather_full_state_dict(model, trainable_only=True)

    def write(self, path: Path, model: torch.nn.Module, fisher: dict, info: dict, anchors: dict) -> Path:
        """Save F and theta* as full tensors by name (collective; rank 0 writes): sharded ones are gathered."""
        if self.is_sharded(model):
            params = self.fisher_params(model)
            fisher = zero3.gather(fisher, params, keep=dist.is_main())
            anchors = zero3.gather(anchors, params, keep=dist.is_main())
        if dist.is_main():
            save_fisher(path, fisher, info, anchors)
        dist.barrier()
        return path

    def on_task_start(self, model: torch.nn.Module, *, resumed: bool) -> None:
        state = Path(self.ctx.output_dir) / STATE_FILE
        params = self.fisher_params(model)
        self.sharded = self.is_sharded(model)
        partitions = False  # whether self.fisher / self.anchors already hold this rank's partitions
        if resumed and state.exists():  # the state of the original start, not of the resumed weights
            self.fisher, self.anchors, self.info = load_fisher(state)
        elif self.config.fisher_path:
            self.fisher, self.anchors, self.info = load_fisher(self.config.fisher_path)
            if self.target == "trainable" and not self.anchors and not self.sharded:
                self.anchors = self.current_anchors(model)
        elif self.config.fisher_data_files:
            dist.print0("ewc: computing the Fisher of the skills to keep")
            self.fisher, self.info = self.compute(model, self.fisher_examples())
            self.anchors = self.current_anchors(model)
            partitions = self.sharded
        if self.fisher is None:  # a first round that only writes the Fisher of what it learns
            return
        if not partitions:
            self._check_names(model)
        if self.sharded and not partitions:  # full tensors of a file: keep this rank's partitions (scatter on read)
            self.fisher = zero3.scatter(self.fisher, params)
            self.anchors = zero3.scatter(self.anchors, params) if self.anchors else zero3.anchors(params)
        self.write(state, model, self.fisher, self.info, self.anchors)
        device = dist.device()
        self.fisher = {n: t.to(device) for n, t in self.fisher.items()}
        self.anchors = {n: t.to(device) for n, t in self.anchors.items()}
        self._params = params
        self._in_place = (self.in_place and self.through_grads and self.target == "trainable" and not self.sharded
                          and grad_buffers.supports(params))
        self._lora = ({f"{n}.base_layer.weight": m for n, m in lora_layers(model)}
                      if self.target == "lora_merged" else {})
        where = ""
        if self.sharded:
            self._sharded_penalty = zero3.ShardedPenalty(self.lam, self.fisher, self.anchors, params)
            if self.lam > 0:
                self._sharded_penalty.install()
            where = (f", sharded over {dist.world_size()} rank(s) by ZeRO-3 "
                     f"({self.state_bytes() / 2**20:.1f} MiB of F + anchors on this rank)")
        dist.print0(f"ewc: lambda={self.lam:g}, {self.info.get('estimator')} Fisher over {len(self.fisher)} tensors "
                    f"from {self.info.get('sequences')} sequences, target={self.target}{where}")

    def state_bytes(self) -> int:
        """Bytes of F and theta* this rank holds."""
        return zero3.nbytes(self.fisher or {}, self.anchors)

    def _check_names(self, model: torch.nn.Module) -> None:
        source = self.config.fisher_path or "ewc.fisher_data_files"
        expected = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.fisher_params(model).items()}
        missing, extra = sorted(set(expected) - set(self.fisher)), sorted(set(self.fisher) - set(expected))
        if missing or extra:
            raise ValueError(f"ewc.fisher_path: {source} does not match the parameters of this job "
                             f"(target={self.target}): {len(missing)} missing (e.g. {missing[:1]}), "
                             f"{len(extra)} unexpected (e.g. {extra[:1]}); it was computed for "
                             f"{self.info.get('model', 'another model')} / target={self.info.get('target')}")
        for n, shape in expected.items():
            if tuple(self.fisher[n].shape) != shape or (n in self.anchors and tuple(self.anchors[n].shape) != shape):
                raise ValueError(f"ewc.fisher_path: {source}: {n} has shape {tuple(self.fisher[n].shape)}, "
                                 f"the model's is {shape}")

    def penalty(self, model: torch.nn.Module, *, logging: bool = True) -> torch.Tensor | None:
        """lambda/2 * sum_i F_i (theta_i - theta*_i)^2, or None when lambda is 0.

        Through the gradients (``through_grads``, the default): a tensor whose backward adds the closed-form gradient
        lambda F (theta - theta*) (lora_merged: its chain rule to A and B) to the parameters' gradients, scaled by
        the gradient it receives (the loop's ``* accum``, the fp16 loss scale) like autograd of the scalar; its value
        is computed only when ``logging`` (else 0). ``through_grads = False``: autograd of the scalar (the reference).
        None when :meth:`add_to_grads` adds the gradient in place (target=trainable under ZeRO 0-2, ``in_place``).
        """
        if self.lam == 0 or self.fisher is None or self.sharded:  # sharded: added to the gradients in the step
            return None
        if not self.through_grads:
            return self._scalar_penalty()
        if self._in_place:  # added into the gradient buffers after the backward (add_to_grads)
            return None
        if self.target == "trainable":
            params = list(self._params.values())
            value = self._value_trainable() if logging else None
            out = through_gradients(value, self._grads_trainable, params)
        else:
            params = [p for m in self._lora.values() for p in _lora_ab(m)]
            value = self._value_merged() if logging else None
            out = through_gradients(value, self._grads_merged, params)
        if logging:
            self._penalty_sum += float(value)
            self._penalty_steps += 1
        return out

    def add_to_grads(self, model: torch.nn.Module, *, logging: bool = True) -> None:
        """After the optimizer step's last backward, before ``engine.step()``: lambda F (theta - theta*) in place.

        target=trainable under ZeRO 0-2 (``in_place``, the default): added into the buffers DeepSpeed's step reads
        (``p.grad``; ZeRO-1/2: this rank's averaged gradient partition, theta from its fp32 master copy;
        distrib_ft/preservation/grad_buffers.py), so the gradient norm and clipping see it as they see the
        autograd penalty's; once per optimizer step, not scaled by the accumulation (it is added after DeepSpeed
        divides by it). The value is computed only when ``logging`` (in the same pass; ZeRO-1/2: summed over the
        ranks' partitions, collective).
        """
        if not self._in_place or self.lam == 0 or self.fisher is None:
            return
        slices = grad_buffers.grad_slices(self._params)
        if slices is None:
            raise RuntimeError("ewc: the gradient buffers changed layout after start-up (set EWC.in_place = False)")
        value = grad_buffers.add_penalty_(slices, self.anchors, self.lam, self.fisher, value=logging)
        if logging:
            value = float(value)
            if grad_buffers.partitioned(self._params):  # this rank's partitions: the sum over ranks
                value = dist.all_reduce_sum([value], device=dist.device())[0]
            self._penalty_sum += value
            self._penalty_steps += 1

    def _scalar_penalty(self) -> torch.Tensor:
        terms = []
        if self.target == "trainable":
            for n, p in self._params.items():
                terms.append((self.fisher[n] * (p.float() - self.anchors[n]).pow(2)).sum())
        else:
            for n, m in self._lora.items():
                terms.append((self.fisher[n] * lora_delta(m).pow(2)).sum())
        value = 0.5 * self.lam * torch.stack(terms).sum()
        self._penalty_sum += value.item()
        self._penalty_steps += 1
        return value

    @torch.no_grad()
    def _value_trainable(self) -> torch.Tensor:
        diffs = torch._foreach_sub([p.detach().float() for p in self._params.values()],
                                   [self.anchors[n] for n in self._params])
        terms = [(self.fisher[n] * d * d).sum() for n, d in zip(self._params, diffs)]
        return 0.5 * self.lam * torch.stack(terms).sum()

    @torch.no_grad()
    def _grads_trainable(self, g: torch.Tensor) -> list[torch.Tensor]:
        """The gradient lambda * g * F (theta - theta*) of every trained parameter, in its dtype."""
        params = list(self._params.values())
        diffs = torch._foreach_sub([p.detach().float() for p in params], [self.anchors[n] for n in self._params])
        torch._foreach_mul_(diffs, [self.fisher[n] for n in self._params])
        torch._foreach_mul_(diffs, g.float() * self.lam)
        return [d.to(p.dtype) for d, p in zip(diffs, params)]

    @torch.no_grad()
    def _value_merged(self) -> torch.Tensor:
        terms = [(self.fisher[n] * lora_delta(m).pow(2)).sum() for n, m in self._lora.items()]
        return 0.5 * self.lam * torch.stack(terms).sum()

    @torch.no_grad()
    def _grads_merged(self, g: torch.Tensor) -> list[torch.Tensor]:
        """The penalty's gradient w.r.t. each layer's A and B, in closed form.

        dW = s B A (W's layout, or its transpose with fan_in_fan_out); d/d dW = lambda F dW, so with
        G = F (.) (B A): d/dB = lambda s^2 G A^T and d/dA = lambda s^2 B^T G (times the incoming gradient ``g``).
        """
        out = []
        for n, m in self._lora.items():
            a_p, b_p = _lora_ab(m)
            a, b = a_p.detach().float(), b_p.detach().float()
            s = float(m.scaling[m.active_adapters[0]])
            f = self.fisher[n].T if getattr(m, "fan_in_fan_out", False) else self.fisher[n]
            grad_ba = torch.mm(b, a).mul_(f)
            c = g.float() * (self.lam * s * s)
            out += [torch.mm(b.T, grad_ba).mul_(c).to(a_p.dtype), torch.mm(grad_ba, a.T).mul_(c).to(b_p.dtype)]
        return out

    def metrics(self) -> dict:
        """``ewc_penalty``: the mean penalty per optimizer step since the last line.

        This rank's value; the parameters it reads are the same on every rank. Sharded: the sum of the ranks'
        partition values (collective: every rank calls it at the same steps).
        """
        if self._sharded_penalty is not None:
            mean = self._sharded_penalty.take_mean(dist.device())
            return {} if mean is None else {"ewc_penalty": mean}
        if not self._penalty_steps:
            return {}
        out = {"ewc_penalty": self._penalty_sum / self._penalty_steps}
        self._penalty_sum, self._penalty_steps = 0.0, 0
        return out

    def on_task_end(self, model: torch.nn.Module, *, final_dir: Path, train_examples) -> list[Path]:
        """With update_after: F of the data just learned, merged online, with new anchors, into final/."""
        if not self.config.update_after:
            return []
        pick = _sample(len(train_examples), self.config.fisher_max_sequences, self.seed)
        dist.print0(f"ewc: computing the Fisher of the data just learned ({len(pick)} sequences) for the next round")
        new, info = self.compute(model, [train_examples[i] for i in pick])
        fisher = (merge_online({k: v.cpu() for k, v in self.fisher.items()}, new, self.config.gamma)
                  if self.fisher else new)
        anchors = self.current_anchors(model)
        rounds = int(self.info.get("rounds", 1 if self.fisher else 0)) + 1
        out = Path(final_dir) / FINAL_FILE
        self.write(out, model, fisher, {**info, "gamma": self.config.gamma, "rounds": rounds}, anchors)
        return [out]


def _lora_ab(m: torch.nn.Module) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    a = m.active_adapters[0]
    return m.lora_A[a].weight, m.lora_B[a].weight


class _ThroughGradients(torch.autograd.Function):
    """A precomputed penalty value whose backward returns closed-form gradients for ``params``.

    torch.autograd.Function (https://pytorch.org/docs/stable/notes/extending.html): the gradients reach each
    parameter's AccumulateGrad like any other, so DeepSpeed's gradient hooks (ZeRO 1/2 reduction and
    partitioning), its averaging over ranks and accumulation steps, the gradient norm and clipping see them
    exactly as the gradients of the autograd penalty.
    """

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g):
        return (None, None, *ctx.grads(g))


def through_gradients(value: torch.Tensor | None, grads, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """A scalar equal to ``value`` (0 when None) whose gradient w.r.t. ``params`` is ``grads(g)`` (a list, in order).

    ``grads`` receives the gradient flowing into the scalar (0-dim tensor) and must return one tensor per
    parameter, of its shape and dtype.
    """
    if value is None:
        value = torch.zeros((), dtype=torch.float32, device=params[0].device)
    return _ThroughGradients.apply(value, grads, *params)


def _sample(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``n`` example indices drawn uniformly (seeded), in order; all when ``k >= n``.

    A file sorted by topic must not give a Fisher of its first topics only.
    """
    if k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
