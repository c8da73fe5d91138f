"""Which examples each rank trains on at each optimizer step: deterministic, so resume is exact.

Map-style data: each epoch is a permutation of the examples seeded by ``seed + epoch``; step ``s``
takes the next ``global_batch`` indices of it (an incomplete last global batch is dropped) and rank
``r`` takes every ``world``-th of them, split into ``gradient_accumulation_steps`` micro-batches.
The same global batch therefore trains the same examples whatever the number of ranks, and the
position is a pure function of the step: resume needs only the step.

Streaming data: each rank reads its own part of the stream (``split_dataset_by_node``), shuffled in
a buffer seeded by ``seed`` and the epoch, and cycles over epochs until ``max_steps``; resume skips
the examples already consumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return num_examples // global_batch


def total_steps(max_steps: int, num_train_epochs: float, num_examples: int | None, global_batch: int) -> int:
    """``max_steps`` when set, else ``ceil(epochs x steps_per_epoch)``."""
    if max_steps > 0:
        return max_steps
    if num_examples is None:
        raise ValueError("training.max_steps: required with data.streaming=true (the stream has no known length)")
    per_epoch = steps_per_epoch(num_examples, global_batch)
    if per_epoch == 0:
        raise ValueError(f"data.train_files: {num_examples} examples are fewer than one global batch of "
                         f"{global_batch} (per_device_train_batch_size x gradient_accumulation_steps x "
                         "num_workers); add data or lower the batch size")
    return math.ceil(num_train_epochs * per_epoch)


def global_batch_indices(step: int, num_examples: int, global_batch: int, seed: int) -> list[int]:
    """The example indices of one global batch at optimizer step ``step``."""
    per_epoch = steps_per_epoch(num_examples, global_batch)
    epoch, within = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_examples, generator=g)
    return perm[within * global_batch:(within + 1) * global_batch].tolist()


def rank_micro_batches(indices: list[int], rank: int, world: int, micro_batch: int) -> list[list[int]]:
    """This rank's share of a global batch, as micro-batches of ``micro_batch`` indices."""
    mine = indices[rank::world]
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


def map_style_steps(dataset, *, start_step: int, micro_batch: int, accum: int, rank: int, world: int,
                    seed: int) -> Iterator[list[list[dict]]]:
    """Yield, for each step from ``start_step``, this rank's micro-batches as lists of examples."""
    n = len(dataset)
    gb = micro_batch * accum * world
    step = start_step
    while True:
        idx = global_batch_indices(step, n, gb, seed)
        yield [[dataset[i] for i in mb] for mb in rank_micro_batches(idx, rank, world, micro_batch)]
        step += 1


def streaming_steps(dataset, *, start_step: int, micro_batch: int, accum: int, rank: int, world: int,
                    seed: int, shuffle_buffer: int = 1000) -> Iterator[list[list[dict]]]:
    """Like :func:`map_style_steps` for a ``datasets.IterableDataset``."""
    from datasets.distributed import split_dataset_by_node

    per_step = micro_batch * accum
    part = split_dataset_by_node(dataset, rank=rank, world_size=world).shuffle(seed=seed, buffer_size=shuffle_buffer)
    to_skip = start_step * per_step

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
    while True:
        flat = [next(it) for _ in range(per_step)]
        yield [flat[i:i + micro_batch] for i in range(0, per_step, micro_batch)]
