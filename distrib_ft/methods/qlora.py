"""QLoRA: LoRA adapters (peft) on a base whose linear layers are quantised by bitsandbytes to 4 or 8 bits.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs": the frozen base in 4-bit NormalFloat (NF4)
with double quantisation of the block scales, LoRA on top in higher precision, gradients flowing through the
dequantised weights into the adapters. ``bits: 8`` is LLM.int8() (Dettmers et al. 2022) under the adapters.

How it is built here: ``apply`` receives the loaded full-precision model, merges ``merge_adapters`` into it (in
full precision, as LoRA does), then replaces every ``nn.Linear`` but the output layer (``lm_head``; embeddings
are not Linear) by ``bnb.nn.Linear4bit`` / ``Linear8bitLt``, quantised on the device the model is on (bitsandbytes
0.45+ runs NF4/FP4 and int8 forward and backward on CPU as well as CUDA), and adds the peft adapter with the
LoRA fields of :class:`~distrib_ft.methods.lora.LoRAConfig`. DeepSpeed's bf16 cast touches floating parameters
only: the packed uint8 / int8 weights and their quantisation state (not parameters) come through it unchanged.

``final/`` is a peft LoRA adapter (``PeftModel.from_pretrained`` loads it on the plain base) plus ``qlora.json``,
the quantisation it was trained under: evaluation (``methods.load_trained``) rebuilds the quantised base from the
base model and puts the adapter on it, so it measures the model that was trained. Checkpoints hold the adapter
only; on resume the quantised base is rebuilt from the base model (quantisation is deterministic).

ZeRO-3 is not supported: it partitions every parameter of the module, the packed weights included, while a
quantised layer's forward needs its whole packed weight together with its quantisation state, which is not a
parameter and is not gathered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from distrib_ft.methods.lora import LoRA, LoRAConfig
from distrib_ft.schema import Strict

SETTINGS = "qlora.json"  # in final/: the quantisation the adapter was trained under
COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
FOUR_BIT_ONLY = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}  # and their defaults


class QLoRAConfig(LoRAConfig):
    """``method: {type: qlora, ...}``: a peft LoRA adapter on a 4-bit (NF4/FP4) or 8-bit quantised base."""

    type: Literal["qlora"] = Field("qlora", description="A LoRA adapter on a bitsandbytes-quantised base (QLoRA).")
    bits: Literal[4, 8] = Field(4, description=(
        "Bits of the frozen base's linear layers (all but lm_head): 4 (QLoRA, bnb Linear4bit) or 8 (LLM.int8(), "
        "bnb Linear8bitLt)."))
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: NormalFloat4 (nf4) or fp4.")
    double_quant: bool = Field(True, description="4 bits: quantise the block scales too (QLoRA's double quantisation).")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "4 bits: dtype of the dequantised matmul. auto: the activations' dtype, i.e. bfloat16 with training.bf16 "
        "under ZeRO-1/2 (the engine runs the module in bf16) and float32 otherwise."))


def quantise(model: torch.nn.Module, *, bits: int, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: str = "auto") -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` but its output layer by a bitsandbytes layer, in place.

    The weights are quantised on the device they are on. Returns ``model``, flagged ``is_loaded_in_4bit`` /
    ``is_loaded_in_8bit`` (what peft reads to put its bitsandbytes LoRA layers on them).
    """
    import bitsandbytes as bnb

    skip = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is skip:
                continue
            w, device = child.weight.data, child.weight.device
            if bits == 4:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=COMPUTE_DTYPES[compute_dtype], compress_statistics=double_quant,
                                          quant_type=quant_type, device="meta")
                layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant,
                                                 quant_type=quant_type, module=layer)
                # On an AVX512-BF16 CPU, bitsandbytes repacks the weight in place at the first no-grad eval
                # forward (and fails when in_features < its block size, 64): one layout for training and eval.
                layer.support_avx512bf16_for_cpu = False
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0, device="meta")
                layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            layer = layer.to(device)  # quantises
            layer.register_state_dict_post_hook(_drop_quant_state)
            setattr(parent, name, layer)
    setattr(model, f"is_loaded_in_{bits}bit", True)
    return model


def _drop_quant_state(module, state_dict, prefix, local_metadata) -> None:
    """Leave bitsandbytes' quantisation state (absmax, SCB, ...) out of a quantised layer's state dict.

    Checkpoints leave the frozen weights out and rebuild them from the base model on resume: the state of a
    weight they do not hold has no place there.
    """
    names = {prefix + n for n, _ in module.named_parameters(recurse=False)}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in names]:
        del state_dict[key]


class QLoRA(LoRA):
    name: ClassVar[str] = "qlora"
    config_class: ClassVar[type[Strict]] = QLoRAConfig
    checkpoint_trainable_only: ClassVar[bool] = True
    artifact: ClassVar[str] = "adapter"
    zero_stages: ClassVar[frozenset[int]] = frozenset({0, 1, 2})
    new_parameters = True

    def __init__(self, config: QLoRAConfig):
        super().__init__(config)
        self.merged_update = False  # EWC-LoRA's Fisher is over dense base weights; here they are quantised

    def check(self, *, zero_stage: int, module_names: list[str] | None = None, config=None) -> None:
        c = self.config
        if zero_stage == 3:
            raise ValueError("method.type: qlora is not supported under ZeRO-3 (it would partition the packed "
                             "quantised weights); use zero2.json")
        if c.bits == 8:
            given = [k for k, default in FOUR_BIT_ONLY.items() if getattr(c, k) != default]
            if given:
                raise ValueError(f"method.{given[0]}: {getattr(c, given[0])!r} applies to bits: 4 only; remove it "
                                 "(this job has bits: 8)")
        if c.use_dora:
            raise ValueError("method.use_dora: DoRA is not supported with type qlora; use type: lora for DoRA")
        super().check(zero_stage=zero_stage, module_names=module_names, config=config)

    def settings(self) -> dict:
        """What :meth:`load_final` needs to rebuild the trained model's quantised base."""
        c = self.config
        return {"bits": c.bits, "quant_type": c.quant_type, "double_quant": c.double_quant,
                "compute_dtype": c.compute_dtype, "merge_adapters": [str(p) for p in c.merge_adapters]}

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import PeftModel

        for path in self.config.merge_adapters:  # earlier rounds, merged in full precision before quantising
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        s = self.settings()
        quantise(model, bits=s["bits"], quant_type=s["quant_type"], double_quant=s["double_quant"],
                 compute_dtype=s["compute_dtype"])
        return LoRA(self.config.model_copy(update={"merge_adapters": []})).apply(model)  # the peft adapter

    def export(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        super().export(model, state_dict, folder)
        (Path(folder) / SETTINGS).write_text(json.dumps(self.settings(), indent=2) + "\n")

    @staticmethod
    def owns_final(path: Path) -> bool:
        return (Path(path) / SETTINGS).is_file() and (Path(path) / "adapter_config.json").is_file()

    @staticmethod
    def load_final(base: str, path: Path, *, load_model) -> torch.nn.Module:
        """The trained model: ``base`` (and the recorded merge_adapters), quantised as in training, + the adapter."""
        from peft import PeftModel

        s = json.loads((Path(path) / SETTINGS).read_text())
        model = load_model(base)
        for earlier in s["merge_adapters"]:
            model = PeftModel.from_pretrained(model, earlier).merge_and_unload()
        quantise(model, bits=s["bits"], quant_type=s["quant_type"], double_quant=s["double_quant"],
                 compute_dtype=s["compute_dtype"])
        return PeftModel.from_pretrained(model, str(path))
