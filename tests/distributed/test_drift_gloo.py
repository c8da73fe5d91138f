"""KL-to-base in the loop: logged at every evaluation, ~0 at step 0, and the same on 2 gloo ranks as on 1."""

import pytest

from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, run_ranks, set_in, toy_alpaca


def test_kl_to_base_two_ranks_equal_one(tmp_path, tiny_model_dir):
    logged = {}
    for world in (1, 2):
        d = tmp_path / f"w{world}"
        raw = job_dict(d, tiny_model_dir, zero=2, max_steps=2, per_device_train_batch_size=4 // world)
        set_in(raw, "distributed.num_workers", world)
        set_in(raw, "data.eval_files", [str(toy_alpaca(d / "new_eval.jsonl", n=7, seed=1))])
        set_in(raw, "monitor", {"kl_to_base": True, "kl_top_k": 16, "eval_at": [0, 2]})
        summary = run_ranks(raw, world, d)[0]
        lines = [r for r in read_metrics(d / "out" / "metrics.jsonl") if "kl_to_base" in r]
        logged[world] = {r["step"]: r["kl_to_base"] for r in lines}
        assert [r["step"] for r in lines] == [0, 2] and abs(logged[world][0]) < 1e-6 and logged[world][2] > 0
        assert summary["decision"] == "accepted"
    assert logged[2][2] == pytest.approx(logged[1][2], rel=1e-4)
