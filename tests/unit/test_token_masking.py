"""Selective Token Masking: exactly the tokens above tau (checked against a direct computation), the random
control masks the same count, and the pass is cached (the loop on the masked labels:
tests/integration/test_token_masking.py)."""

import math

import torch
from transformers import AutoModelForCausalLM

from distrib_ft.data.formats import IGNORE_INDEX, build_dataset
from distrib_ft.preservation.token_masking import apply_token_masking
from tests.jobs import toy_alpaca


@torch.no_grad()
def _direct_nll(model, ds):
    """Per example and position t: -log p(token t | tokens < t) for target labels, one sequence at a time."""
    out = []
    for ex in ds:
        ids = torch.tensor([ex["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        out.append({t: -float(logp[t - 1, ex["input_ids"][t]]) for t in range(1, len(ex["labels"]))
                    if ex["labels"][t] != IGNORE_INDEX})
    return out


def test_stm_masks_exactly_the_tokens_above_tau(tmp_path, tiny_model_dir, tiny_tokenizer):
    ds, _ = build_dataset([str(toy_alpaca(tmp_path / "d.jsonl", n=12))], fmt="alpaca", tokenizer=tiny_tokenizer,
                          max_seq_length=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    direct = _direct_nll(model, ds)
    values = sorted(v for d in direct for v in d.values())
    tau = math.exp((values[len(values) // 2] + values[len(values) // 2 + 1]) / 2)  # about half of the tokens above
    masked, stats = apply_token_masking(model, ds, mode="stm", threshold=tau, batch_size=5, pad_token_id=0,
                                        output_dir=tmp_path, model_name="tiny", seed=0)
    expected_total = 0
    for d, before, after in zip(direct, ds, masked):
        expected = {t for t, v in d.items() if math.exp(v) > tau}
        expected_total += len(expected)
        dropped = {t for t, (a, b) in enumerate(zip(before["labels"], after["labels"])) if a != b}
        assert dropped == expected
        assert all(after["labels"][t] == IGNORE_INDEX for t in dropped)
    assert stats["masked_tokens"] == expected_total and stats["target_tokens"] == len(values)
    assert 0.3 < stats["masked_fraction"] < 0.7

    rnd, rstats = apply_token_masking(model, ds, mode="random", threshold=tau, batch_size=5, pad_token_id=0,
                                      output_dir=tmp_path, model_name="tiny", seed=0)  # from the cache
    assert rstats["masked_tokens"] == stats["masked_tokens"]
    dropped_random = [t for before, after in zip(ds, rnd) for t, (a, b) in
                      enumerate(zip(before["labels"], after["labels"])) if a != b]
    assert len(dropped_random) == expected_total
    assert len(list((tmp_path / "token_masking").glob("base_nll-*.npz"))) == 1
