"""EWC's gradient added in place into ZeRO-1/2's gradient partitions at 2 gloo ranks = autograd of the scalar penalty.

distrib_ft/preservation/grad_buffers.py: each rank adds lambda F (theta - theta*) to the part of every parameter
its partition holds (DeepSpeed's ``_hp_mapping`` fragments; at 2 ranks some parameter is split between the
ranks). Full fine-tuning of the tiny model, 3 steps, accumulation 2, clipping on; the reference is the same job
with ``EWC.through_grads = False``.
"""

import pytest
import torch
from safetensors.torch import load_file

from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, run_ranks, set_in, toy_alpaca

WORLD_SIZE = 2


def train_with(job, *, through_grads: bool) -> dict:
    """loop.train with the penalty's path set; also whether a parameter's gradient is split between the ranks."""
    from distrib_ft.preservation.ewc import EWC
    from distrib_ft.runtime.loop import finish, run_steps, setup
    from distrib_ft.runtime.worker import start_worker

    EWC.through_grads = through_grads
    run = setup(start_worker(job), False)
    ewc = next(d for d in run.defences if d.name == "ewc")
    split = any(getattr(p, "_hp_mapping", None) is not None and p._hp_mapping.lp_fragment_address.numel < p.numel()
                for p in ewc._params.values())
    summary = finish(run, run_steps(run))
    return {**summary, "in_place": ewc._in_place, "split": split}


@pytest.mark.parametrize("zero", [2])  # ZeRO-1 shares the partition code (1 rank: tests/integration)
def test_in_place_partitions_equal_autograd_penalty(tmp_path, tiny_model_dir, zero):
    old = toy_alpaca(tmp_path / "old.jsonl", n=8, seed=11)
    out, ranks = {}, {}
    for through_grads in (True, False):
        d = tmp_path / f"grads-{through_grads}"
        raw = job_dict(d, tiny_model_dir, zero=zero, max_steps=3, gradient_accumulation_steps=2,
                       per_device_train_batch_size=2, learning_rate=3e-3)
        set_in(raw, "method.type", "full")
        set_in(raw, "ewc", {"lambda": 1e4, "fisher_data_files": [str(old)], "fisher_max_sequences": 8})
        ranks[through_grads] = run_ranks(raw, WORLD_SIZE, d, entry=f"{__name__}:train_with",
                                         through_grads=through_grads)
        out[through_grads] = d / "out"
    assert all(r["in_place"] for r in ranks[True]) and not any(r["in_place"] for r in ranks[False])
    assert any(r["split"] for r in ranks[True])  # a parameter whose gradient lies partly on each rank
    new, ref = (load_file(out[g] / "final" / "model.safetensors") for g in (True, False))
    assert new.keys() == ref.keys() and new
    for k in ref:
        torch.testing.assert_close(new[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    rows = {g: [r for r in read_metrics(out[g] / "metrics.jsonl") if "loss" in r] for g in out}
    for key in ("ewc_penalty", "grad_norm"):  # the value summed over the ranks' partitions; norm before clipping
        torch.testing.assert_close(torch.tensor([r[key] for r in rows[True]]),
                                   torch.tensor([r[key] for r in rows[False]]), rtol=1e-4, atol=1e-9, msg=key)
    assert rows[True][-1]["ewc_penalty"] > 0 and min(r["grad_norm"] for r in rows[False]) > 1.0  # clipped
