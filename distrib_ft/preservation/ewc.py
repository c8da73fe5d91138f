"""Elastic Weight Consolidation, distributed-correct: loss + lambda/2 * sum_i F_i (theta_i - theta*_i)^2.

Two targets (``ewc.target``):

``trainable``    F over the parameters the job trains, anchored at theta* = their values at the start of
                 the job, or the anchors stored with a Fisher file (a previous round's final weights).
                 For full / partial fine-tuning, and for EWC on a LoRA adapter that keeps training.
``lora_merged``  EWC-LoRA: each round trains a *fresh* adapter on top of the earlier rounds' adapters,
                 merged into the base (``method.merge_adapters``). F is over the dense weights W that the
                 adapters update (computed at the merged point), the anchor is the merged model the round
                 starts from, so theta - theta* is exactly this round's update dW = B @ A * scale and the
                 penalty is lambda/2 * sum F_W * dW^2. A fresh adapter's own values are no anchor (B = 0, A random).

Supported: ZeRO 0, 1, 2 for both targets; ZeRO-3 when the parameters the penalty reads are whole on
every rank (LoRA matrices below ``stage3_param_persistence_threshold``). Full-parameter EWC under ZeRO-3
(sharded Fisher and anchors) is refused at start-up. Under bf16 the penalty reads the module's bf16 copy
of theta; F and theta* are fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from distrib_ft.runtime import dist
from distrib_ft.data.formats import collate
from distrib_ft.preservation.fisher import compute_fisher, load_fisher, merge_online, save_fisher
from distrib_ft.preservation import Hooks

STATE_FILE = "ewc_state.safetensors"
FINAL_FILE = "fisher.safetensors"


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every peft LoRA layer with an adapter."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and len(m.lora_A)]


def lora_delta(m: torch.nn.Module) -> torch.Tensor:
    """The dense update B @ A * scale of a LoRA layer's active adapter, in W's layout, fp32."""
    a = m.active_adapters[0]
    delta = (m.lora_B[a].weight.float() @ m.lora_A[a].weight.float()) * m.scaling[a]
    return delta.T if getattr(m, "fan_in_fan_out", False) else delta


class EWC(Hooks):
    name = "ewc"

    def __init__(self, *, lam: float, estimator: str = "empirical", target: str = "trainable",
                 fisher_file: str | None = None, fisher_examples: Callable[[], list[dict]] | None = None,
                 batch_size: int = 8, update_after: bool = False, gamma: float = 1.0, max_sequences: int = 512,
                 pad_token_id: int = 0, seed: int = 0, model_name: str = ""):
        self.lam, self.estimator, self.target = lam, estimator, target
        self.fisher_file, self.fisher_examples = fisher_file, fisher_examples
        self.batch_size, self.update_after, self.gamma = batch_size, update_after, gamma
        self.max_sequences, self.pad_token_id, self.seed, self.model_name = max_sequences, pad_token_id, seed, model_name
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchors: dict[str, torch.Tensor] = {}
        self.info: dict = {}

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "EWC":
        e, d = cfg.ewc, cfg.data

        def examples() -> list[dict]:
            from distrib_ft.data.formats import build_dataset

            ds, _ = dist.main_first(lambda: build_dataset(
                e.fisher_files, fmt=e.fisher_format or d.format, tokenizer=tokenizer, max_seq_length=d.max_seq_length,
                prompt_template=d.prompt_template, text_field=d.text_field))
            return [ds[i] for i in _sample(len(ds), e.fisher_max_sequences, cfg.training.seed)]

        return cls(lam=e.lambda_, estimator=e.estimator, target=e.target, fisher_file=e.fisher_file,
                   fisher_examples=examples if e.fisher_files else None, batch_size=e.fisher_batch_size,
                   update_after=e.update_fisher_after, gamma=e.gamma, max_sequences=e.fisher_max_sequences,
                   pad_token_id=tokenizer.pad_token_id, seed=cfg.training.seed, model_name=cfg.model.name_or_path)

    # --- which parameters ---------------------------------------------------------------------------
    def fisher_params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The parameters F is over, by their ``named_parameters()`` names."""
        if self.target == "trainable":
            return {n: p for n, p in model.named_parameters() if p.requires_grad}
        return {f"{n}.base_layer.weight": m.base_layer.weight for n, m in lora_layers(model)}

    def check(self, *, zero_stage: int, model: torch.nn.Module) -> None:
        if self.target == "lora_merged" and not lora_layers(model):
            raise ValueError("ewc.target: lora_merged, but the model has no LoRA layers")
        if zero_stage != 3 or self.lam == 0:
            return
        read = ([p for _, m in lora_layers(model) for p in (*m.lora_A.parameters(), *m.lora_B.parameters())]
                if self.target == "lora_merged" else list(self.fisher_params(model).values()))
        if any(hasattr(p, "ds_id") and not getattr(p, "ds_persist", False) for p in read):
            raise ValueError("ewc.lambda: under ZeRO-3 the EWC penalty needs the trained parameters whole on every "
                             "rank (LoRA matrices below zero_optimization.stage3_param_persistence_threshold); "
                             "full-parameter EWC under ZeRO-3 is not supported: use ds_configs/zero2.json")

    # --- hooks ------------------------------------------------------------------------------------
    def compute(self, model: torch.nn.Module, examples: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
        fisher, info = compute_fisher(model, self.fisher_params(model), examples,
                                      lambda b: collate(b, self.pad_token_id), estimator=self.estimator,
                                      batch_size=self.batch_size, seed=self.seed)
        return fisher, {**info, "model": self.model_name, "target": self.target}

    def current_anchors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """theta* for target=trainable: the fp32 values of the trained parameters (collective)."""
        if self.target != "trainable":
            return {}
        from distrib_ft.runtime.checkpoint import gather_full_state_dict

        return gather_full_state_dict(model, trainable_only=True)

    def on_task_start(self, model: torch.nn.Module, *, output_dir: Path, resumed: bool) -> None:
        state = Path(output_dir) / STATE_FILE
        if resumed and state.exists():  # the state of the original start, not of the resumed weights
            self.fisher, self.anchors, self.info = load_fisher(state)
        elif self.fisher_file:
            self.fisher, self.anchors, self.info = load_fisher(self.fisher_file)
            if self.target == "trainable" and not self.anchors:
                self.anchors = self.current_anchors(model)
        elif self.fisher_examples is not None:
            dist.print0("ewc: computing the Fisher of the skills to keep")
            self.fisher, self.info = self.compute(model, self.fisher_examples())
            self.anchors = self.current_anchors(model)
        if self.fisher is None:  # a first round that only writes the Fisher of what it learns
            return
        self._check_names(model)
        if dist.is_main():
            save_fisher(state, self.fisher, self.info, self.anchors)
        dist.barrier()
        device = dist.device()
        self.fisher = {n: t.to(device) for n, t in self.fisher.items()}
        self.anchors = {n: t.to(device) for n, t in self.anchors.items()}
        self._params = self.fisher_params(model)
        self._lora = {f"{n}.base_layer.weight": m for n, m in lora_layers(model)} if self.target == "lora_merged" else {}
        dist.print0(f"ewc: lambda={self.lam:g}, {self.info.get('estimator')} Fisher over {len(self.fisher)} tensors "
                    f"from {self.info.get('sequences')} sequences, target={self.target}")

    def _check_names(self, model: torch.nn.Module) -> None:
        source = self.fisher_file or "ewc.fisher_files"
        expected = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.fisher_params(model).items()}
        missing, extra = sorted(set(expected) - set(self.fisher)), sorted(set(self.fisher) - set(expected))
        if missing or extra:
            raise ValueError(f"ewc.fisher_file: {source} does not match the parameters of this job "
                             f"(target={self.target}): {len(missing)} missing (e.g. {missing[:1]}), "
                             f"{len(extra)} unexpected (e.g. {extra[:1]}); it was computed for "
                             f"{self.info.get('model', 'another model')} / target={self.info.get('target')}")
        for n, shape in expected.items():
            if tuple(self.fisher[n].shape) != shape or (n in self.anchors and tuple(self.anchors[n].shape) != shape):
                raise ValueError(f"ewc.fisher_file: {source}: {n} has shape {tuple(self.fisher[n].shape)}, "
                                 f"the model's is {shape}")

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """lambda/2 * sum_i F_i (theta_i - theta*_i)^2, or None when lambda is 0."""
        if self.lam == 0 or self.fisher is None:
            return None
        terms = []
        if self.target == "trainable":
            for n, p in self._params.items():
                terms.append((self.fisher[n] * (p.float() - self.anchors[n]).pow(2)).sum())
        else:
            for n, m in self._lora.items():
                terms.append((self.fisher[n] * lora_delta(m).pow(2)).sum())
        return 0.5 * self.lam * torch.stack(terms).sum()

    def on_task_end(self, model: torch.nn.Module, *, final_dir: Path, train_examples) -> list[Path]:
        """With update_after: F of the data just learned, merged online, with new anchors, into final/."""
        if not self.update_after:
            return []
        pick = _sample(len(train_examples), self.max_sequences, self.seed)
        dist.print0(f"ewc: computing the Fisher of the data just learned ({len(pick)} sequences) for the next round")
        new, info = self.compute(model, [train_examples[i] for i in pick])
        fisher = merge_online({k: v.cpu() for k, v in self.fisher.items()}, new, self.gamma) if self.fisher else new
        anchors = self.current_anchors(model)
        rounds = int(self.info.get("rounds", 1 if self.fisher else 0)) + 1
        out = Path(final_dir) / FINAL_FILE
        if dist.is_main():
            save_fisher(out, fisher, {**info, "gamma": self.gamma, "rounds": rounds}, anchors)
        dist.barrier()
        return [out]


def _sample(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``n`` example indices drawn uniformly (seeded), in order; all when ``k >= n``. A file sorted
    by topic must not give a Fisher of its first topics only."""
    if k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
