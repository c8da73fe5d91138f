"""The Fisher with 2 gloo ranks equals the 1-rank Fisher on the union of the data, under ZeRO 0, 2 and 3.

7 sequences: the ranks get 4 and 3, so the shorter shard also runs its zero-weight pass (ZeRO-3 gathers
parameters collectively in every forward).
"""

import pytest
import torch

from distrib_ft.preservation.fisher import load_fisher
from tests.jobs import job_dict, run_ranks, set_in, toy_alpaca

WORLD_SIZE = 2


@pytest.mark.parametrize("zero, method", [(0, "full"), (2, "full"), (3, "full"), (2, "lora")])
def test_two_rank_fisher_equals_one_rank_fisher(tmp_path, tiny_model_dir, zero, method):
    fisher_data = toy_alpaca(tmp_path / "old.jsonl", n=7, seed=3)
    files = {}
    for world in (1, WORLD_SIZE):
        d = tmp_path / f"w{world}"
        raw = job_dict(d, tiny_model_dir, zero=zero)
        set_in(raw, "method.type", method)
        set_in(raw, "ewc.fisher_data_files", [str(fisher_data)])
        files[world] = d / "fisher.safetensors"
        run_ranks(raw, world, d, entry="distrib_ft.jobs:fisher", out=str(files[world]))
    f1, a1, i1 = load_fisher(files[1])
    f2, a2, i2 = load_fisher(files[WORLD_SIZE])
    assert i1["sequences"] == i2["sequences"] == 7 and i1["target_tokens"] == i2["target_tokens"]
    assert i1["estimator"] == "empirical" and i1["model"]
    assert f1.keys() == f2.keys() and f1.keys() == a1.keys()
    assert sum(float(t.sum()) for t in f1.values()) > 0
    for n in f1:
        assert f1[n].dtype == torch.float32
        torch.testing.assert_close(f2[n], f1[n], rtol=1e-5, atol=1e-12, msg=n)
