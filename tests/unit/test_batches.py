"""The batch schedule: exact, rank-count independent, resumable by step; the exact replay ratio."""

import pytest

from distrib_ft.data.batches import (
    deal,
    global_batch_indices,
    map_style_steps,
    rank_replay_before,
    replay_before,
    replay_counts,
    total_steps,
)


def test_epoch_is_a_permutation_and_epochs_differ():
    n, gb = 20, 4
    epoch0 = [i for s in range(5) for i in global_batch_indices(s, n, gb, seed=1)]
    epoch1 = [i for s in range(5, 10) for i in global_batch_indices(s, n, gb, seed=1)]
    assert sorted(epoch0) == list(range(20)) and sorted(epoch1) == list(range(20))
    assert epoch0 != epoch1


def test_ranks_partition_the_global_batch():
    idx = global_batch_indices(3, 100, 12, seed=0)
    for world in (1, 2, 3):
        shares = deal(idx, [12 // world] * world)
        assert shares == [idx[r::world] for r in range(world)]  # without replay: every world-th example


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_continues_the_same_stream(world):
    data = list(range(50))
    for ratio in (0.0, 0.3):
        for rank in range(world):
            full = map_style_steps(data, start_step=0, per_rank=4, rank=rank, world=world, seed=7, replay_ratio=ratio)
            steps = [next(full) for _ in range(30)]
            resumed = map_style_steps(data, start_step=17, per_rank=4, rank=rank, world=world, seed=7,
                                      replay_ratio=ratio)
            assert [next(resumed) for _ in range(13)] == steps[17:]


@pytest.mark.parametrize("ratio,gb", [(0.25, 16), (0.01, 16), (0.05, 8), (1 / 3, 4), (0.3, 6)])
def test_the_replay_ratio_is_exact_at_every_step(ratio, gb):
    total = 0
    for step in range(200):
        r = sum(replay_counts(step, ratio, gb, world=1))
        total += r
        assert abs(total - ratio * gb * (step + 1)) < 1  # the running ratio never drifts
        assert r in (int(ratio * gb), int(ratio * gb) + 1)
    if ratio == 0.25:
        assert {sum(replay_counts(s, ratio, gb, 2)) for s in range(100)} == {4}  # exactly 4 of 16 every step


@pytest.mark.parametrize("world", [1, 2, 3])
def test_replay_slots_are_dealt_to_ranks_in_turn(world):
    ratio, gb = 0.3, 6 * world
    for step in range(50):
        counts = replay_counts(step, ratio, gb, world)
        assert max(counts) - min(counts) <= 1
        for rank in range(world):
            assert rank_replay_before(step + 1, ratio, gb, rank, world) - rank_replay_before(step, ratio, gb, rank,
                                                                                            world) == counts[rank]
    assert sum(rank_replay_before(50, ratio, gb, r, world) for r in range(world)) == replay_before(50, ratio, gb)


def test_new_examples_fill_the_rest_of_the_global_batch():
    data = list(range(40))
    world, per_rank, ratio = 2, 4, 0.25
    streams = [map_style_steps(data, start_step=0, per_rank=per_rank, rank=r, world=world, seed=0,
                               replay_ratio=ratio) for r in range(world)]
    seen = []
    for step in range(6):  # 6 new examples per step
        shares = [next(s) for s in streams]
        counts = replay_counts(step, ratio, per_rank * world, world)
        assert [len(x) for x in shares] == [per_rank - c for c in counts]
        seen += [i for x in shares for i in x]
    assert len(seen) == 36 and len(set(seen)) == 36  # within the first epoch: no example twice


def test_total_steps():
    assert total_steps(7, 3.0, 100, 10) == 7
    assert total_steps(-1, 2.5, 100, 10) == 25
    assert total_steps(-1, 1.0, 100, 10, replay_ratio=0.5) == 20  # half of each batch is old data
