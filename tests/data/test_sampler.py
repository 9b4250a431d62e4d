"""Sampler: matches torch's DistributedSampler and LLaVA's modality-grouped sampler; exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from titan_llava.data.sampler import DistributedSampleSampler


def _take(sampler: DistributedSampleSampler, n: int) -> list[int]:
    return [next(sampler).index for _ in range(n)]


@pytest.mark.parametrize("num_samples,world", [(10, 1), (10, 2), (11, 2), (7, 3)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_matches_torch_distributed_sampler(num_samples: int, world: int, shuffle: bool) -> None:
    per_rank = -(-num_samples // world)
    for rank in range(world):
        ours = DistributedSampleSampler(
            num_samples, dp_rank=rank, dp_world_size=world, shuffle=shuffle, seed=5
        )
        got = _take(ours, 3 * per_rank)  # three epochs in one stream
        expected = []
        ref = DistributedSampler(range(num_samples), num_replicas=world, rank=rank, shuffle=shuffle, seed=5)
        for epoch in range(3):
            ref.set_epoch(epoch)
            expected += list(ref)
        assert got == expected


def test_ranks_are_disjoint_and_cover_the_epoch() -> None:
    seen = []
    for rank in range(4):
        seen += _take(DistributedSampleSampler(40, dp_rank=rank, dp_world_size=4, seed=1), 10)
    assert sorted(seen) == list(range(40))


def test_epochs_differ_and_depend_on_seed() -> None:
    a = _take(DistributedSampleSampler(50, seed=0), 100)
    assert a[:50] != a[50:] and sorted(a[:50]) == sorted(a[50:]) == list(range(50))
    assert a != _take(DistributedSampleSampler(50, seed=1), 100)


def test_state_resume_across_epoch_wrap() -> None:
    full = DistributedSampleSampler(9, dp_rank=1, dp_world_size=2, seed=3)
    ref = [next(full) for _ in range(20)]
    for k in (0, 3, 4, 5, 11):
        s = DistributedSampleSampler(9, dp_rank=1, dp_world_size=2, seed=3)
        for _ in range(k):
            next(s)
        state = s.state_dict()
        resumed = DistributedSampleSampler(9, dp_rank=1, dp_world_size=2, seed=3)
        resumed.reset(state)
        assert [next(resumed) for _ in range(20 - k)] == ref[k:]
    assert ref[4].epoch == 0 and ref[5].epoch == 1 and ref[5].position == 1  # 5 per rank per epoch


# ---- the reference LengthGroupedSampler(group_by_modality=True) + accelerate batch sharding, ------
# ---- transcribed from LLaVA's llava_trainer.py (every draw from one seeded generator). ------------


def _ref_split_to_even_chunks(indices, lengths, num_chunks):
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    num_indices_per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    chunks_lengths = [0 for _ in range(num_chunks)]
    for index in indices:
        shortest_chunk = chunks_lengths.index(min(chunks_lengths))
        chunks[shortest_chunk].append(index)
        chunks_lengths[shortest_chunk] += lengths[index]
        if len(chunks[shortest_chunk]) == num_indices_per_chunk:
            chunks_lengths[shortest_chunk] = float("inf")
    return chunks


def _ref_length_grouped(lengths, batch_size, world_size, generator):
    indices = torch.randperm(len(lengths), generator=generator)
    megabatch_size = world_size * batch_size
    megabatches = [indices[i : i + megabatch_size].tolist() for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    megabatches = [_ref_split_to_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for m in megabatches for batch in m for i in batch]


def _ref_modality_grouped(lengths, batch_size, world_size, generator):
    mm_indices, mm_lengths = zip(*[(i, l) for i, l in enumerate(lengths) if l > 0])
    lang_indices, lang_lengths = zip(*[(i, -l) for i, l in enumerate(lengths) if l < 0])
    mm_shuffle = [mm_indices[i] for i in _ref_length_grouped(mm_lengths, batch_size, world_size, generator)]
    lang_shuffle = [lang_indices[i] for i in _ref_length_grouped(lang_lengths, batch_size, world_size, generator)]
    megabatch_size = world_size * batch_size
    mm_megabatches = [mm_shuffle[i : i + megabatch_size] for i in range(0, len(mm_shuffle), megabatch_size)]
    lang_megabatches = [lang_shuffle[i : i + megabatch_size] for i in range(0, len(lang_shuffle), megabatch_size)]
    last_mm, last_lang = mm_megabatches[-1], lang_megabatches[-1]
    additional_batch = last_mm + last_lang
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatch_indices = torch.randperm(len(megabatches), generator=generator)
    megabatches = [megabatches[i] for i in megabatch_indices]
    if len(additional_batch) > 0:
        megabatches.append(sorted(additional_batch))
    return [i for megabatch in megabatches for i in megabatch]


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2)])
def test_modality_grouping_matches_reference(world: int, accum: int) -> None:
    rng = np.random.default_rng(0)
    batch = 3
    # 46 image + 26 text samples, total 72 = a multiple of world * batch for every case here, so no
    # wrap-around padding is involved and the comparison is exact.
    lengths = np.concatenate([rng.integers(1, 300, 46), -rng.integers(1, 300, 26)])
    rng.shuffle(lengths)
    num_chunks = world * accum
    for epoch in range(2):
        g = torch.Generator().manual_seed(7 + epoch)
        flat = _ref_modality_grouped(lengths.tolist(), batch, num_chunks, g)
        batches = [flat[i : i + batch] for i in range(0, len(flat), batch)]  # HF BatchSampler
        for rank in range(world):
            expected = [i for j, b in enumerate(batches) if j % world == rank for i in b]  # accelerate
            sampler = DistributedSampleSampler(
                len(lengths), dp_rank=rank, dp_world_size=world, seed=7, modality_lengths=lengths,
                batch_size=batch, global_batch_size=batch * world * accum,
            )
            assert sampler.epoch_indices(epoch).tolist() == expected


def test_modality_grouped_batches_are_single_modality() -> None:
    rng = np.random.default_rng(1)
    lengths = np.where(rng.random(200) < 0.8, 1, -1) * rng.integers(1, 500, 200)
    batch, world = 4, 2
    per_rank = []
    for rank in range(world):
        s = DistributedSampleSampler(
            200, dp_rank=rank, dp_world_size=world, seed=0, modality_lengths=lengths, batch_size=batch
        )
        per_rank.append(s.epoch_indices(0).reshape(-1, batch))
    assert sorted(np.concatenate([p.reshape(-1) for p in per_rank]).tolist()) == list(range(200))
    # Interleave the ranks' batches back into the global batch order.
    global_batches = [b for pair in zip(*per_rank) for b in pair]
    mixed = [j for j, b in enumerate(global_batches) if len(set(np.sign(lengths[b]).tolist())) > 1]
    assert mixed, "this data should leave a mixed leftover megabatch"
    # Only the merged leftover megabatch (< 2 megabatches, last) may mix modalities.
    leftover_batches = -(-2 * batch * world // batch)
    assert min(mixed) >= len(global_batches) - leftover_batches
    # Within a megabatch the batches are sorted by length: the first batch holds the longest.
    assert lengths[per_rank[0][0]].min() >= 0 or lengths[per_rank[0][0]].max() <= 0


def test_packed_grouping_deals_single_modality_megabatches_one_sample_at_a_time() -> None:
    """What the loader asks for under packing (batch_size 1, megabatch M samples): every rank gets
    M / world samples of each megabatch, and each megabatch but the merged leftover is one modality."""
    rng = np.random.default_rng(2)
    lengths = np.where(rng.random(203) < 0.85, 1, -1) * rng.integers(1, 500, 203)
    mega, world = 8, 2
    per_rank = [
        DistributedSampleSampler(203, dp_rank=r, dp_world_size=world, seed=5, modality_lengths=lengths,
                                 batch_size=1, global_batch_size=mega).epoch_indices(0)
        for r in range(world)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 102  # 203 wrapped to 204
    interleaved = np.stack(per_rank, axis=1).reshape(-1)  # the global order, back again
    megabatches = interleaved[: 203 // mega * mega].reshape(-1, mega)
    modalities = [set(np.sign(lengths[m]).tolist()) for m in megabatches]
    # Whole megabatches come first: all but the last two (the leftover merges two partial ones).
    assert all(len(m) == 1 for m in modalities[:-2])
    assert {-1} in modalities and {1} in modalities


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedSampleSampler(5, dp_rank=2, dp_world_size=2)
    with pytest.raises(ValueError, match="shuffle"):
        DistributedSampleSampler(5, shuffle=False, modality_lengths=np.ones(5, dtype=np.int32))
    with pytest.raises(ValueError, match="no samples"):
        DistributedSampleSampler(0)
    with pytest.raises(ValueError, match="global_batch_size 5 is not a multiple of the local batch 2"):
        DistributedSampleSampler(6, modality_lengths=np.ones(6, dtype=np.int32), batch_size=2,
                                 global_batch_size=5)


@pytest.mark.parametrize("num_samples", [1, 7, 40, 41])
@pytest.mark.parametrize("world, batch", [(1, 1), (2, 3), (4, 2)])
@pytest.mark.parametrize("grouped", [False, True])
def test_samples_per_epoch_is_the_length_of_every_epoch(num_samples, world, batch, grouped):
    lengths = np.array([(i % 5 + 1) * (1 if i % 3 else -1) for i in range(num_samples)])
    for rank in range(world):
        s = DistributedSampleSampler(num_samples, dp_rank=rank, dp_world_size=world, seed=2,
                                     modality_lengths=lengths if grouped else None,
                                     batch_size=batch)
        assert all(len(s.epoch_indices(e)) == s.samples_per_epoch() for e in range(3))
