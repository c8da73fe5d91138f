"""Prompt tuning through peft: P trainable virtual-token embeddings prepended to every input; the model stays frozen.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning": a soft prompt of P embeddings
(P x hidden parameters, e.g. 20 x 576 = 11,520 on SmolLM2-135M) is the only thing that trains. It starts random
(peft's ``torch.nn.Embedding`` init, N(0, 1)) or, with ``init_text``, from the embeddings of that text in the
job's tokenizer, repeated or cut to P tokens (the paper's class-label / vocabulary init works better than random).

With virtual tokens the model's logits are (B, P + T, V); ``runtime.loss.drop_virtual_tokens`` keeps the last T,
so every loss, evaluation, KL and Fisher pass reads the real tokens only. peft prepends ones to the attention mask
and drops ``position_ids`` (positions run 0..P+T-1 over the virtual tokens, then the input), which is why packed
batches (``data.packing``: restarting positions, no mask) are refused: the packed examples would attend to each
other.

Generation goes through peft's ``generate``, repaired by :func:`fix_generation` (peft 0.21 under transformers 5
prepended the prompt again at every decoding step). ZeRO-3 runs: the soft prompt is small enough to stay whole on
every rank (below ``stage3_param_persistence_threshold``); the text init reads the partitioned embedding matrix
inside a gather.

Unlike LoRA (B = 0), the model at step 0 is not the base model: the initial prompt already changes its outputs.
:meth:`PromptTuning.base_model` (peft's ``disable_adapter``) gives the loop the base model's outputs for what must
be measured against the base: the monitor's step-0 baselines, KL-to-base's reference and token masking's base pass
(generative replay's answers are still the prompted model's).

final/ is a peft adapter (adapter_config.json, adapter_model.safetensors with ``prompt_embeddings``): written here
from the gathered fp32 values (peft's ``save_pretrained`` reads the module's weight, which is bf16 under DeepSpeed's
bf16 and partitioned under ZeRO-3) and loaded back by ``PeftModel.from_pretrained``. It cannot be merged into the
weights: the prompt is an input, not an update of a weight.
"""

from __future__ import annotations

import contextlib
import copy
import json
import types
import warnings
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from distrib_ft.schema import Strict

ADAPTER = "default"


class PromptTuningConfig(Strict):
    """``method: {type: prompt_tuning, ...}``: a trainable soft prompt of virtual tokens (peft)."""

    type: Literal["prompt_tuning"] = Field("prompt_tuning", description="A soft prompt of virtual tokens (peft).")
    num_virtual_tokens: int = Field(20, ge=1, le=1024, description=(
        "Virtual tokens prepended to every sequence (the paper: 20-100); each adds hidden_size parameters and one "
        "position to every forward."))
    init_text: str | None = Field(None, description=(
        "Initialise the virtual tokens from the embeddings of this text in the model's tokenizer (repeated or cut to "
        "num_virtual_tokens), e.g. a description of the task; null: random N(0, 1) embeddings."))

    @field_validator("init_text")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("an empty text has no tokens to start from; give some text, or null for a random init")
        return value


class PromptTuning:
    name: ClassVar[str] = "prompt_tuning"
    config_class: ClassVar[type[Strict]] = PromptTuningConfig
    checkpoint_trainable_only: ClassVar[bool] = True
    artifact: ClassVar[str] = "adapter"
    zero_stages: ClassVar[frozenset[int]] = frozenset({0, 1, 2, 3})
    mergeable: ClassVar[bool] = False  # the soft prompt is an input, not a weight update
    new_parameters = True
    merged_update = False

    def __init__(self, config: PromptTuningConfig):
        self.config = config

    def check(self, *, zero_stage: int, module_names: list[str] | None = None, config=None) -> None:
        if config is None:
            return
        if config.data.packing:
            raise ValueError("data.packing: not supported with method.type=prompt_tuning (peft prepends the virtual "
                             "tokens and drops position_ids, so packed examples would attend to each other); set "
                             "data.packing: false")

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import PromptTuningConfig as PeftPromptTuningConfig
        from peft import PromptTuningInit, TaskType, get_peft_model

        c = self.config
        kwargs = {}
        if c.init_text is not None:
            kwargs = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=c.init_text,
                          tokenizer_name_or_path=model.name_or_path)
        peft_config = PeftPromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=c.num_virtual_tokens,
                                             **kwargs)
        embedding = model.get_input_embeddings().weight
        # ZeRO-3 (zero.Init) partitions the embedding matrix while the model loads: the text init reads rows of it.
        with _gathered(embedding, enabled=c.init_text is not None and hasattr(embedding, "ds_id")):
            model = get_peft_model(model, peft_config)
        # peft registers the base model's embedding a second time, as the child ``word_embeddings``: its state_dict
        # then holds the frozen matrix under that alias, which DeepSpeed's exclude_frozen_parameters (it drops the
        # names of named_parameters(), where an alias is deduplicated away) keeps in every checkpoint, and ZeRO-3
        # would hook the module twice. A plain attribute: peft's forward and generate read it as before.
        words = model._modules.pop("word_embeddings")
        object.__setattr__(model, "word_embeddings", words)
        return fix_generation(model)

    def base_model(self, module: torch.nn.Module):
        """A context in which ``module`` (the prompt-tuned model) computes as the base model: no virtual tokens."""
        return module.disable_adapter()

    @staticmethod
    def owns_final(path: Path) -> bool:
        """A peft prompt-tuning adapter: loaded here so that its ``generate`` gets :func:`fix_generation` too."""
        config = Path(path) / "adapter_config.json"
        return config.is_file() and json.loads(config.read_text()).get("peft_type") == "PROMPT_TUNING"

    @staticmethod
    def load_final(base: str, path: Path, *, load_model) -> torch.nn.Module:
        from peft import PeftModel

        return fix_generation(PeftModel.from_pretrained(load_model(base), str(path)))

    def export(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        from safetensors.torch import save_file

        (name,) = [k for k in state_dict if k.startswith(f"prompt_encoder.{ADAPTER}.")]
        config = copy.copy(model.peft_config[ADAPTER])
        config.inference_mode = True  # what peft's save_pretrained writes: loads without the tokenizer
        config.save_pretrained(str(folder))
        save_file({"prompt_embeddings": state_dict[name].contiguous()}, str(Path(folder) / "adapter_model.safetensors"),
                  metadata={"format": "pt"})


def _gathered(param: torch.nn.Parameter, enabled: bool):
    """DeepSpeed's read-only gather of a ZeRO-3 parameter (a no-op when not enabled)."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])


def fix_generation(model: torch.nn.Module) -> torch.nn.Module:
    """``model.generate`` of a peft prompt-tuning model, made to equal greedy decoding by full forwards.

    Two faults of peft 0.21's ``prepare_inputs_for_generation`` with transformers 5 (measured on the tiny model:
    logits off by 0.02-0.05 from the second new token on, and 7e-4 for a left-padded row at the first):

    - transformers 5 passes the KV cache as ``cache``; peft looks for ``past_key_values``, finds none, and prepends
      the virtual tokens again at every decoding step. Here peft sees the cache under the name it reads.
    - peft drops ``position_ids`` (their width is the input's, not P + input): positions then run over the left
      padding of a batch, so a padded row differs from the same prompt alone. Here they are rebuilt from the
      attention mask peft has extended by P ones, as transformers does for a plain model.
    """
    model.prepare_inputs_for_generation = types.MethodType(_prepare_inputs_for_generation, model)
    return model


def _prepare_inputs_for_generation(self, *args, **kwargs):
    original, renamed = self.base_model_prepare_inputs_for_generation, []

    def under_peft_name(*args, **kwargs):
        out = original(*args, **kwargs)
        if "cache" in out and "past_key_values" not in out:
            out["past_key_values"] = out.pop("cache")
            renamed.append(True)
        return out

    self.base_model_prepare_inputs_for_generation = under_peft_name
    try:
        with warnings.catch_warnings():  # peft drops them; they are rebuilt below
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            out = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    finally:
        self.base_model_prepare_inputs_for_generation = original
    if renamed and "past_key_values" in out:  # back to the name the model's forward takes
        out["cache"] = out.pop("past_key_values")
    mask = out.get("attention_mask")
    inputs = out.get("inputs_embeds") if out.get("inputs_embeds") is not None else out.get("input_ids")
    if torch.is_tensor(mask) and mask.dim() == 2 and inputs is not None:
        positions = mask.long().cumsum(-1) - 1
        positions.masked_fill_(mask == 0, 1)
        out["position_ids"] = positions[:, -inputs.shape[1]:]
    return out
