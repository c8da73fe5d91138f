"""Which examples each rank trains on at each optimizer step: deterministic, so resume is exact.

A global batch holds ``G = per_device_train_batch_size x gradient_accumulation_steps x world``
sequences; with replay, ``r_s`` of them at step ``s`` are old examples from the replay buffer and
``G - r_s`` are new. ``r_s = floor((s+1) x ratio x G) - floor(s x ratio x G)``: exactly
``ratio x G`` every step when that is a whole number, otherwise it alternates between the two
nearest whole numbers so that the running ratio after every step is exact (the ``R(s) =
floor(s x ratio x G)`` replay examples before step ``s`` are within one of ``s x ratio x G``).
Replay example ``g`` (counted from the start of the job) goes to rank ``g % world``, so ranks get
old examples in turn and each rank's replay position is a pure function of the step.

New data, map-style: the examples are read in epochs, each a permutation seeded by ``seed + epoch``
cut to a whole number of global batches (a remainder smaller than ``G`` is dropped); step ``s``
takes the next ``G - r_s`` of them and deals them round-robin to the ranks, each up to its free
slots (without replay, rank ``r`` gets every ``world``-th example of the global batch). The same
global batch therefore trains the same examples whatever the number of ranks, and the position is a
pure function of the step: resume needs only the step.

New data, streaming: each rank reads its own part of the stream (``split_dataset_by_node``), shuffled
in a buffer seeded by ``seed`` and the epoch, and cycles over epochs until ``max_steps``; resume
skips the examples already consumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import torch


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Whole global batches in one epoch of ``num_examples`` (the remainder of the epoch is not used)."""
    return num_examples // global_batch


def replay_before(step: int, ratio: float, global_batch: int) -> int:
    """R(s): replay examples in the global batches before step ``s`` (exact rational arithmetic)."""
    return math.floor(step * global_batch * Fraction(str(ratio)).limit_denominator(10**6))


def _below(total: int, rank: int, world: int) -> int:
    """How many of the examples 0..total-1 fall to ``rank`` when example g goes to rank g % world."""
    return max(0, (total - rank + world - 1) // world)


def rank_replay_before(step: int, ratio: float, global_batch: int, rank: int, world: int) -> int:
    """This rank's replay position at step ``s``: replay examples it trained on before ``s``."""
    return _below(replay_before(step, ratio, global_batch), rank, world)


def replay_counts(step: int, ratio: float, global_batch: int, world: int) -> list[int]:
    """Replay examples of each rank at step ``s`` (their sum is r_s)."""
    a, b = replay_before(step, ratio, global_batch), replay_before(step + 1, ratio, global_batch)
    return [_below(b, k, world) - _below(a, k, world) for k in range(world)]


def total_steps(max_steps: int, num_train_epochs: float, num_examples: int | None, global_batch: int,
                replay_ratio: float = 0.0) -> int:
    """``max_steps`` when set, else enough steps for ``num_train_epochs`` passes over the new data."""
    if max_steps > 0:
        return max_steps
    if num_examples is None:
        raise ValueError("training.max_steps: required with data.streaming=true (the stream has no known length)")
    per_epoch = steps_per_epoch(num_examples, global_batch)
    if per_epoch == 0:
        raise ValueError(f"data.train_files: {num_examples} examples are fewer than one global batch of "
                         f"{global_batch} (per_device_train_batch_size x gradient_accumulation_steps x "
                         "num_workers); add data or lower the batch size")
    wanted = math.ceil(num_train_epochs * per_epoch * global_batch)  # new examples to train on
    step = math.ceil(num_train_epochs * per_epoch)
    while step * global_batch - replay_before(step, replay_ratio, global_batch) < wanted:
        step += 1
    return step


def new_data_indices(start: int, count: int, num_examples: int, global_batch: int, seed: int) -> list[int]:
    """Positions ``start .. start+count-1`` of the new-data order, as example indices.

    The order is a sequence of epoch permutations, each cut to a whole number of global batches.
    """
    usable = steps_per_epoch(num_examples, global_batch) * global_batch
    out, pos = [], start
    while len(out) < count:
        epoch, within = divmod(pos, usable)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(count - len(out), usable - within)
        out += perm[within:within + take].tolist()
        pos += take
    return out


def global_batch_indices(step: int, num_examples: int, global_batch: int, seed: int) -> list[int]:
    """The example indices of one global batch at optimizer step ``step`` (no replay)."""
    return new_data_indices(step * global_batch, global_batch, num_examples, global_batch, seed)


def deal(indices: list[int], room: list[int]) -> list[list[int]]:
    """Deal indices round-robin to ranks, skipping a rank once its ``room`` is full."""
    out: list[list[int]] = [[] for _ in room]
    k = 0
    for i in indices:
        while len(out[k]) >= room[k]:
            k = (k + 1) % len(room)
        out[k].append(i)
        k = (k + 1) % len(room)
    return out


def map_style_steps(dataset, *, start_step: int, per_rank: int, rank: int, world: int, seed: int,
                    replay_ratio: float = 0.0) -> Iterator[list[dict]]:
    """Yield, for each step from ``start_step``, this rank's new examples.

    Each step's list holds ``per_rank`` minus this rank's replay slots of that step.
    """
    n, gb = len(dataset), per_rank * world
    step = start_step
    while True:
        replay = replay_counts(step, replay_ratio, gb, world)
        start = step * gb - replay_before(step, replay_ratio, gb)
        idx = new_data_indices(start, gb - sum(replay), n, gb, seed)
        yield [dataset[i] for i in deal(idx, [per_rank - r for r in replay])[rank]]
        step += 1


def streaming_steps(dataset, *, start_step: int, per_rank: int, rank: int, world: int, seed: int,
                    replay_ratio: float = 0.0, shuffle_buffer: int = 1000) -> Iterator[list[dict]]:
    """Like :func:`map_style_steps` for a ``datasets.IterableDataset``."""
    from datasets.distributed import split_dataset_by_node

    gb = per_rank * world
    part = split_dataset_by_node(dataset, rank=rank, world_size=world).shuffle(seed=seed, buffer_size=shuffle_buffer)
    to_skip = start_step * per_rank - rank_replay_before(start_step, replay_ratio, gb, rank, world)

    def examples():
        epoch = 0
        while True:
            part.set_epoch(epoch)
            produced = 0
            for ex in part:
                produced += 1
                yield ex
            if produced == 0:
                raise ValueError(f"data.train_files: rank {rank} of {world} got no streamed examples; "
                                 "the data has fewer shards or records than workers")
            epoch += 1

    it = examples()
    for _ in range(to_skip):
        next(it)
    step = start_step
    while True:
        yield [next(it) for _ in range(per_rank - replay_counts(step, replay_ratio, gb, world)[rank])]
        step += 1
