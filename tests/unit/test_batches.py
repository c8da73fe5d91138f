"""The batch schedule: exact, rank-count independent, resumable by step."""

from distrib_ft.batches import global_batch_indices, map_style_steps, rank_micro_batches, total_steps


def test_epoch_is_a_permutation_and_epochs_differ():
    n, gb = 20, 4
    epoch0 = [i for s in range(5) for i in global_batch_indices(s, n, gb, seed=1)]
    epoch1 = [i for s in range(5, 10) for i in global_batch_indices(s, n, gb, seed=1)]
    assert sorted(epoch0) == list(range(20)) and sorted(epoch1) == list(range(20))
    assert epoch0 != epoch1


def test_ranks_partition_the_global_batch():
    idx = global_batch_indices(3, 100, 12, seed=0)
    for world in (1, 2, 3):
        shares = [i for r in range(world) for mb in rank_micro_batches(idx, r, world, 12 // world // 2) for i in mb]
        assert sorted(shares) == sorted(idx)


def test_resume_continues_the_same_stream():
    data = list(range(50))
    full = map_style_steps(data, start_step=0, micro_batch=2, accum=2, rank=1, world=2, seed=7)
    steps = [next(full) for _ in range(30)]
    resumed = map_style_steps(data, start_step=17, micro_batch=2, accum=2, rank=1, world=2, seed=7)
    assert [next(resumed) for _ in range(13)] == steps[17:]


def test_total_steps():
    assert total_steps(7, 3.0, 100, 10) == 7
    assert total_steps(-1, 2.5, 100, 10) == 25
