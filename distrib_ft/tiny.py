"""Tiny Hugging Face models built from a config, with a byte-level BPE tokenizer trained offline.

Tests and benchmarks use these instead of hub downloads: a real ``LlamaForCausalLM`` and a real
``PreTrainedTokenizerFast`` with a ChatML chat template, saved as an ordinary model folder, so that
everything downstream (``from_pretrained``, peft, DeepSpeed) runs the same code path as for a
pretrained model.
"""

from __future__ import annotations

import string
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "convert 12 km to m: 12 km = 12000 m",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response:",
    "question answer user assistant system hello world",
] + [" ".join(string.ascii_lowercase), " ".join(string.digits), string.punctuation]


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (every string is encodable) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                     vocab_size: int = 384, seed: int = 0, max_position_embeddings: int = 512, **config) -> Path:
    """Write a tiny Llama model and its tokenizer to ``out_dir`` and return the folder.

    ``config``: more LlamaConfig keys (e.g. ``tie_word_embeddings=True``, ``attention_bias=True``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tokenizer(vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_heads, max_position_embeddings=max_position_embeddings,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      **{"tie_word_embeddings": False, "attention_dropout": 0.0, **config})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
