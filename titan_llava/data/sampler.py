"""Stateful, DP-sharded, infinite sample-index stream (a torchdata.nodes source node).

Each epoch is one deterministic global order (seed + epoch), optionally grouped by modality and
length as LLaVA's LengthGroupedSampler(group_by_modality=True) does; every rank reads a disjoint
share of it. State is just (epoch, position), so resuming never replays `next()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torchdata.nodes import BaseNode


@dataclass(frozen=True)
class SampleRef:
    """One draw of the sampler: the sample `index`, and the sampler state right after drawing it."""

    index: int
    epoch: int
    position: int


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal `indices` (longest first) into `num_chunks` equal-count chunks of balanced total length.

    The reference's rule: each index goes to the chunk with the smallest running length; a full
    chunk stops taking any. Counts that do not divide fall back to striding.
    """
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, num_chunks: int, generator: torch.Generator
) -> list[int]:
    """Random megabatches of num_chunks*batch_size, each sorted longest-first and split evenly."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch_size = num_chunks * batch_size
    order: list[int] = []
    for start in range(0, len(perm), megabatch_size):
        megabatch = sorted(perm[start : start + megabatch_size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, num_chunks):
            order.extend(chunk)
    return order


def modality_grouped_order(
    modality_lengths: Sequence[int], batch_size: int, num_chunks: int, generator: torch.Generator
) -> list[int]:
    """LLaVA's modality-grouped order: all-image and all-text megabatches, shuffled together.

    Positive lengths are samples with an image, negative are text-only. The two modalities' last
    (partial) megabatches are merged, sorted by index, and go last, as in the reference. Unlike the
    reference, which draws the within-modality permutations from torch's global RNG, every draw here
    comes from `generator` (so the order depends on the seed and epoch only).
    """
    lengths = list(modality_lengths)
    assert all(length != 0 for length in lengths), "modality lengths must be non-zero"
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_order([abs(x) for x in lengths], batch_size, num_chunks, generator)
    mm = [i for i, length in enumerate(lengths) if length > 0]
    lang = [i for i, length in enumerate(lengths) if length < 0]
    mm_order = [mm[i] for i in length_grouped_order([lengths[i] for i in mm], batch_size, num_chunks, generator)]
    lang_order = [
        lang[i] for i in length_grouped_order([-lengths[i] for i in lang], batch_size, num_chunks, generator)
    ]
    megabatch_size = num_chunks * batch_size
    mm_mega = [mm_order[i : i + megabatch_size] for i in range(0, len(mm_order), megabatch_size)]
    lang_mega = [lang_order[i : i + megabatch_size] for i in range(0, len(lang_order), megabatch_size)]
    leftover = mm_mega[-1] + lang_mega[-1]
    megabatches = mm_mega[:-1] + lang_mega[:-1]
    shuffled = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    if leftover:
        shuffled.append(sorted(leftover))
    return [i for megabatch in shuffled for i in megabatch]


class DistributedSampleSampler(BaseNode[SampleRef]):
    """Yields this DP rank's SampleRefs, epoch after epoch, forever.

    Without grouping: a seeded permutation (or 0..N-1 when not shuffling), wrapped around to a
    multiple of dp_world_size and strided by rank (torch DistributedSampler, drop_last=False: a few
    samples repeat so every rank has the same epoch length). With `modality_lengths`: the grouped
    order, wrapped around to a multiple of dp_world_size * batch_size, cut into batches of
    `batch_size` dealt round-robin to ranks (what accelerate does with the reference's sampler), so
    every rank's batch holds one modality. `global_batch_size` sets the megabatch (reference:
    per-device batch * world size * gradient accumulation).
    """

    EPOCH_KEY = "epoch"
    POSITION_KEY = "position"

    def __init__(
        self,
        num_samples: int,
        *,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        modality_lengths: np.ndarray | None = None,
        batch_size: int = 1,
        global_batch_size: int | None = None,
    ):
        super().__init__()
        if num_samples <= 0:
            raise ValueError("the dataset has no samples")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size})")
        if modality_lengths is not None:
            if not shuffle:
                raise ValueError("group_by_modality_length needs shuffle = true (the grouping is random)")
            if len(modality_lengths) != num_samples:
                raise ValueError("modality_lengths must have one entry per sample")
            global_batch_size = global_batch_size or batch_size * dp_world_size
            if global_batch_size % batch_size:
                raise ValueError(
                    f"global_batch_size {global_batch_size} is not a multiple of the local batch {batch_size}"
                )
        self.num_samples = num_samples
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.shuffle = shuffle
        self.seed = seed
        self.modality_lengths = modality_lengths
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        # Where reset(None) starts: the beginning, or the resume point the loader sets.
        self.start_state: dict[str, Any] | None = None
        self.epoch = 0
        self.position = 0
        self._indices: np.ndarray | None = None
        self._indices_epoch = -1

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in order."""
        if self._indices_epoch == epoch and self._indices is not None:
            return self._indices
        generator = torch.Generator().manual_seed(self.seed + epoch)
        world = self.dp_world_size
        if self.modality_lengths is None:
            if self.shuffle:
                order = torch.randperm(self.num_samples, generator=generator).numpy()
            else:
                order = np.arange(self.num_samples)
            order = _wrap_to_multiple(order, world)
            indices = order[self.dp_rank :: world]
        else:
            num_chunks = self.global_batch_size // self.batch_size
            lengths = self.modality_lengths.tolist()
            order = np.asarray(modality_grouped_order(lengths, self.batch_size, num_chunks, generator))
            batches = _wrap_to_multiple(order, world * self.batch_size).reshape(-1, self.batch_size)
            indices = batches[self.dp_rank :: world].reshape(-1)
        self._indices, self._indices_epoch = indices.astype(np.int64), epoch
        return self._indices

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        state = initial_state if initial_state is not None else self.start_state
        if state is None:
            self.epoch, self.position = 0, 0
        else:
            self.epoch = int(state[self.EPOCH_KEY])
            self.position = int(state[self.POSITION_KEY])

    def next(self) -> SampleRef:
        indices = self.epoch_indices(self.epoch)
        if self.position >= len(indices):
            self.epoch, self.position = self.epoch + 1, 0
            indices = self.epoch_indices(self.epoch)
        index = int(indices[self.position])
        self.position += 1
        return SampleRef(index, self.epoch, self.position)

    def get_state(self) -> dict[str, Any]:
        return {self.EPOCH_KEY: self.epoch, self.POSITION_KEY: self.position}

    def samples_per_epoch(self) -> int:
        """len(epoch_indices(e)) for every epoch e, computed without building (or caching) an
        order: safe to call from the consumer's thread while a worker iterates."""
        if self.modality_lengths is None:
            return -(-self.num_samples // self.dp_world_size)
        per_round = self.dp_world_size * self.batch_size
        return -(-self.num_samples // per_round) * self.batch_size


def _wrap_to_multiple(order: np.ndarray, multiple: int) -> np.ndarray:
    """Extend `order` with its own head (repeatedly if needed) to a length divisible by `multiple`."""
    pad = (-len(order)) % multiple
    if pad == 0:
        return order
    reps = -(-pad // len(order))
    return np.concatenate([order, np.tile(order, reps)[:pad]])
