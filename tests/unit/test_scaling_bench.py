"""bench/scaling.py's on-paper arithmetic: parameter counts from a config against peft's, and the bytes formulas."""

import sys

import pytest

from tests.jobs import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import scaling  # noqa: E402


def test_param_counts_agree_with_peft_on_a_real_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=100, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False)
    counts = scaling.param_counts(shape, r=16, persistence=10_000)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["zero3_gathered"] == sum(p.numel() for p in model.parameters() if p.numel() >= 10_000)
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=scaling.TARGETS))
    assert counts["lora_trainable"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_bytes_formulas():
    counts = {"total": 1000, "lora_trainable": 10, "zero3_gathered": 900}
    # ZeRO-2 = one ring all-reduce of the trainable parameters: 2 (N-1)/N x bytes
    assert scaling.predicted_bytes("lora", 2, counts, 8, 2) == pytest.approx(2 * 7 / 8 * 10 * 2)
    assert scaling.predicted_bytes("full", 2, counts, 8, 2) == pytest.approx(2 * 7 / 8 * 1000 * 2)
    # ZeRO-3 = gathered in forward and backward + the gradients' reduce-scatter
    assert scaling.predicted_bytes("full", 3, counts, 64, 4) == pytest.approx((2 * 900 + 1000) * 63 / 64 * 4)
    assert scaling.predicted_bytes("lora", 3, counts, 64, 4) == pytest.approx((2 * 900 + 10) * 63 / 64 * 4)
    # what a rank sends for the sizes DeepSpeed's comms logger records (whole buffer / one shard)
    assert scaling.sent_per_rank("all_reduce", 100, 4) == pytest.approx(150)
    assert scaling.sent_per_rank("reduce_scatter_tensor", 100, 4) == pytest.approx(75)
    assert scaling.sent_per_rank("all_gather_into_tensor", 25, 4) == pytest.approx(75)
