"""Packed examples are isolated: an example's loss does not depend on what was packed before it."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distrib_ft.data.formats import IGNORE_INDEX, build_dataset, collate
from distrib_ft.runtime.loss import token_nll_rows


def blocks(tmp_path, name, texts, tokenizer, block):
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ds, _ = build_dataset([str(f)], fmt="text", tokenizer=tokenizer, max_seq_length=block, packing=True)
    return ds


def test_an_example_packed_after_another_has_the_same_loss_as_after_a_third(tmp_path, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a, c = "the river runs past seven green stones", "a cloud of light over the table and the apple tree"
    b = "convert 5 km to m: 5 km = 5000 m"
    la, lb, lc = (len(tok(x)["input_ids"]) + 1 for x in (a, b, c))  # + eos
    # Two blocks that end with b, after a and after c (each block exactly one pair long).
    first = blocks(tmp_path, "ab", [a, b], tok, la + lb)[0]
    second = blocks(tmp_path, "cb", [c, b], tok, lc + lb)[0]
    assert first["position_ids"] == list(range(la)) + list(range(lb))
    assert first["labels"][0] == IGNORE_INDEX and first["labels"][la] == IGNORE_INDEX  # an example's first token
    with torch.no_grad():
        def nll_of_b(block, start):
            b_only = dict(block, labels=[IGNORE_INDEX] * start + block["labels"][start:])
            return token_nll_rows(model, collate([b_only], tok.pad_token_id))[0].item()

        torch.testing.assert_close(nll_of_b(first, la), nll_of_b(second, lc), rtol=1e-5, atol=1e-5)
        # and equal to b alone, unpacked (its first token is not a target there either)
        alone = blocks(tmp_path, "b", [b], tok, lb)[0]
        torch.testing.assert_close(nll_of_b(first, la), nll_of_b(alone, 0), rtol=1e-5, atol=1e-5)
