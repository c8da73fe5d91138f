"""Resume at another world size, the pure logic (distrib_ft/runtime/reshard.py): which batch keys keep the global
batch, what is refused with which line, and that a step's examples depend on the global batch only."""

import json

import pytest

from distrib_ft.data import batches
from distrib_ft.runtime.checkpoint import check_owner
from distrib_ft.runtime.reshard import fit_batch, fitted


@pytest.mark.parametrize(("global_batch", "world", "micro", "expected"), [
    (4, 1, 2, (2, 2)),  # 2 workers x 2 x 1 -> 1 worker: the micro-batch stays, accumulation doubles
    (4, 2, 2, (2, 1)),  # 1 worker x 2 x 2 -> 2 workers
    (4, 2, 4, (2, 1)),  # 1 worker x 4 x 1 -> 2 workers: the micro-batch shrinks to the share
    (12, 2, 4, (3, 2)),  # share 6: the largest divisor not above 4 is 3
    (16, 4, 3, (2, 2)),  # share 4: 3 does not divide it, 2 does
    (7, 7, 5, (1, 1)),
    (8, 1, 8, (8, 1)),
])
def test_fit_batch_keeps_the_global_batch_without_a_larger_micro_batch(global_batch, world, micro, expected):
    got = fit_batch(global_batch, world, micro)
    assert got == expected
    assert got[0] * got[1] * world == global_batch and got[0] <= micro


def test_a_worker_count_that_cannot_keep_the_global_batch_is_one_line_naming_the_keys():
    with pytest.raises(ValueError) as e:
        fit_batch(4, 3, 2)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("distributed.num_workers: 3 workers cannot keep the checkpoint's global batch of 4 "
                   "(training.per_device_train_batch_size x training.gradient_accumulation_steps x "
                   "distributed.num_workers); resume with a number of workers that divides it (1, 2, 4)")


def _owner(world, micro, accum, **job):
    return {"world_size": world, "global_batch": micro * accum * world,
            "job": {"training": {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accum,
                                 "seed": 0}, **job}}


def test_fitted_uses_keys_that_keep_the_global_batch_and_refits_the_others():
    saved = _owner(2, 2, 1)
    assert fitted(saved, _owner(2, 2, 1), "ck") is None  # the same geometry
    assert fitted(saved, _owner(1, 2, 1), "ck") == (2, 2)  # only the workers changed: refitted
    assert fitted(saved, _owner(1, 1, 4), "ck") is None  # the user's keys keep the global batch: as they are
    assert fitted(saved, _owner(2, 1, 2), "ck") is None  # the same workers, another split of the same batch
    assert fitted(saved, _owner(2, 1, 1), "ck") == (1, 2)  # a smaller micro-batch (out of memory): accumulation
    assert fitted(_owner(1, 2, 2), _owner(1, 2, 1), "ck") == (2, 2)  # the job file again, after a 2 -> 1 resume
    with pytest.raises(ValueError, match="^distributed.num_workers: 3 workers cannot keep the checkpoint's global "
                                         "batch of 4"):
        fitted(saved, _owner(3, 2, 1), "ck")
    with pytest.raises(ValueError, match=r"--resume: ck: its job.json records no global batch"):
        fitted({"world_size": 2, "job": {}}, _owner(1, 2, 1), "ck")


def test_check_owner_accepts_another_world_size_and_refuses_streaming_there(tmp_path):
    ckpt = tmp_path / "step-4"
    ckpt.mkdir()
    (ckpt / "job.json").write_text(json.dumps(_owner(2, 2, 1, data={"streaming": True})))
    check_owner(ckpt, _owner(2, 2, 1, data={"streaming": True}))
    with pytest.raises(ValueError, match=r"distributed.num_workers: --resume: .*step-4 was written by 2 worker\(s\) "
                                         r"and data.streaming is true: .*; set distributed.num_workers: 2 to resume"):
        check_owner(ckpt, _owner(1, 2, 1, data={"streaming": True}))
    (ckpt / "job.json").write_text(json.dumps(_owner(2, 2, 1, data={"streaming": False})))
    check_owner(ckpt, _owner(1, 2, 1, data={"streaming": False}))  # the batch keys differ from job.json's: fine
    check_owner(ckpt, _owner(4, 1, 1, data={"streaming": False}))


def test_a_steps_examples_depend_on_the_global_batch_not_on_the_rank_split():
    """Why a resume at another world size trains the same examples: map_style_steps deals each global batch."""
    data = list(range(40))

    def step_sets(world, per_rank, steps=6, start=0):
        its = [batches.map_style_steps(data, start_step=start, per_rank=per_rank, rank=r, world=world, seed=3)
               for r in range(world)]
        return [sorted(x for it in its for x in next(it)) for _ in range(steps)]

    one = step_sets(1, 4)
    assert step_sets(2, 2) == one and step_sets(4, 1) == one
    assert step_sets(2, 2, steps=3, start=3) == one[3:]  # resumed at step 3 on another size
    assert len({x for s in one for x in s}) == 24  # no repeats within the epoch
