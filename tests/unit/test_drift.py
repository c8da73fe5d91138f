"""KL-to-base: zero for the base itself, equal to the full KL when k covers the vocabulary, and the same on 2
ranks as on 1 (the distributed part: tests/distributed/test_eval_gloo.py's pattern, here one rank)."""

import copy

import torch
from transformers import AutoModelForCausalLM

from distrib_ft.data.formats import build_dataset, collate
from distrib_ft.monitor.drift import base_top_k, kl_to_base
from tests.jobs import toy_alpaca


def test_kl_to_base_is_zero_for_the_base_and_the_full_kl_with_the_whole_vocabulary(tmp_path, tiny_model_dir,
                                                                                   tiny_tokenizer):
    ds, _ = build_dataset([str(toy_alpaca(tmp_path / "e.jsonl", n=6))], "alpaca", tiny_tokenizer, 64)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pad = tiny_tokenizer.pad_token_id
    vocab = base.config.vocab_size
    cache = base_top_k(base, ds, k=vocab, batch_size=4, pad_token_id=pad)
    same = kl_to_base(base, ds, cache, batch_size=4, pad_token_id=pad)
    assert abs(same["kl_to_base"]) < 1e-6 and abs(same["kl_topk_mass"] - 1.0) < 1e-5
    moved = copy.deepcopy(base)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.05 * torch.randn_like(moved.lm_head.weight))
    got = kl_to_base(moved, ds, cache, batch_size=4, pad_token_id=pad)["kl_to_base"]
    # the full KL(base || moved) per target token, computed directly on the whole set
    batch = collate([ds[i] for i in range(len(ds))], pad)
    with torch.no_grad():
        lp_b, lp_m = (torch.log_softmax(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                        .logits[:, :-1], -1) for m in (base, moved))
    mask = batch["labels"][:, 1:] != -100
    full = (lp_b.exp() * (lp_b - lp_m)).sum(-1)[mask].mean().item()
    assert full > 1e-4 and abs(got - full) < 1e-5 * max(1.0, full)
    top8 = kl_to_base(moved, ds, base_top_k(base, ds, k=8, batch_size=4, pad_token_id=pad), batch_size=4,
                      pad_token_id=pad)
    assert 0 < top8["kl_topk_mass"] < 1
