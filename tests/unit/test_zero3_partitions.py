"""The slicing of EWC's sharded state (distrib_ft/preservation/zero3.py): a full tensor cut into the flat partitions
ZeRO-3 gives each rank and joined back, for sizes that do not divide by the world size (no DeepSpeed, no ranks)."""

import pytest
import torch

from distrib_ft.preservation.zero3 import join_partitions, partition_size, take_partition


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4), (1,)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partitions_join_back_to_the_full_tensor(shape, world):
    full = torch.randn(shape)
    parts = [take_partition(full, r, world) for r in range(world)]
    numel = full.numel()
    part = -(-numel // world)  # DeepSpeed pads numel up to a multiple of the world size, then splits evenly
    assert partition_size(numel, world) == part
    assert all(p.shape == (part,) for p in parts)
    flat = full.reshape(-1)
    for r, p in enumerate(parts):  # rank r owns [r * part, (r + 1) * part) of the flat tensor, zeros past its end
        start, stop = min(r * part, numel), min((r + 1) * part, numel)
        assert torch.equal(p[:stop - start], flat[start:stop])
        assert not p[stop - start:].any()
    assert torch.equal(join_partitions(parts, shape), full)


def test_a_file_written_at_one_world_size_reads_at_another():
    full = torch.arange(11.0).reshape(1, 11)
    at_two = join_partitions([take_partition(full, r, 2) for r in range(2)], (1, 11))
    at_three = [take_partition(at_two, r, 3) for r in range(3)]
    assert [p.tolist() for p in at_three] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]]
    assert torch.equal(join_partitions(at_three, (1, 11)), full)
