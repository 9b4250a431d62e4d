"""Rows and batches from processed samples: best-fit packing with a bounded look-ahead (or one
sample per row) + collation.

The Packer node is the pipeline's stateful core: its state (sampler position after the last sample
it consumed, the refs of samples it holds but has not emitted, and the counters) is small, holds no
tensors, and on load re-materialises the held samples by processing them again.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Mapping

import torch
from torchdata.nodes import BaseNode

from titan_llava.constants import IGNORE_INDEX
from titan_llava.data.batch import Batch
from titan_llava.data.processing import ProcessedSample, SkippedSample
from titan_llava.data.sampler import DistributedSampleSampler, SampleRef
from titan_llava.loss import loss_positions

logger = logging.getLogger(__name__)

# What the Packer yields: (batch, pipeline state right after it, strict-mode error or None).
Emitted = tuple["Batch | None", dict, "tuple[str, str, str] | None"]


def collate_rows(
    rows: list[list[ProcessedSample]], pad_id: int, seq_len: int | None, packed: bool
) -> Batch:
    """A Batch from rows of samples; rows are padded at the end to `seq_len` (or the longest row)."""
    lengths = [sum(len(s) for s in row) for row in rows]
    width = seq_len if seq_len is not None else max(lengths)
    assert max(lengths) <= width
    batch_size = len(rows)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((batch_size, width), dtype=torch.long)
    document_ids = torch.zeros((batch_size, width), dtype=torch.long) if packed else None
    tiles: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for r, row in enumerate(rows):
        offset = 0
        for d, sample in enumerate(row):
            n = len(sample)
            input_ids[r, offset : offset + n] = sample.input_ids
            labels[r, offset : offset + n] = sample.labels
            positions[r, offset : offset + n] = torch.arange(n)
            if document_ids is not None:
                document_ids[r, offset : offset + n] = d
            if sample.pixel_values is not None:
                tiles.append(sample.pixel_values)
                sizes.extend(sample.image_sizes)
            offset += n
        if offset < width:
            if packed:
                # Padding is its own document (and positions restart) so nothing attends across it.
                document_ids[r, offset:] = len(row)
                positions[r, offset:] = torch.arange(width - offset)
            else:
                # Right padding continues the positions, as an unpacked (HF-style) row would.
                positions[r, offset:] = torch.arange(offset, width)
    loss_index, loss_targets = loss_positions(labels, document_ids)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        positions=positions,
        document_ids=document_ids,
        pixel_values=torch.cat(tiles) if tiles else None,
        image_sizes=torch.tensor(sizes, dtype=torch.long) if sizes else None,
        sample_ids=[[s.sample_id for s in row] for row in rows],
        loss_index=loss_index,
        loss_targets=loss_targets,
    )


def best_fit_rows(
    length_at: Callable[[int], int], num_rows: int, row_len: int, lookahead: int
) -> list[list[int]]:
    """Plan `num_rows` packed rows over a buffer of samples in arrival order; returns, per row, the
    buffer indices it takes (in row order).

    Each row starts with the oldest sample not yet placed (so no sample waits for more than a
    bounded number of rows), then, while space is left, takes the longest sample that fits among
    the next `lookahead` samples not yet placed (ties: the older). `lookahead = 1` is plain greedy
    packing in order: a row closes as soon as the next sample does not fit. `length_at(i)` may pull
    samples from upstream; it is only asked for indices it needs.
    """
    assert num_rows >= 1 and lookahead >= 1
    placed: set[int] = set()
    rows: list[list[int]] = []
    oldest = 0
    for _ in range(num_rows):
        while oldest in placed:
            oldest += 1
        first = length_at(oldest)
        assert 0 < first <= row_len
        row, space = [oldest], row_len - first
        placed.add(oldest)
        while space > 0:
            best, best_len, seen, i = -1, 0, 0, oldest
            while seen < lookahead:  # the next `lookahead` unplaced samples
                if i not in placed:
                    seen += 1
                    n = length_at(i)
                    if best_len < n <= space:
                        best, best_len = i, n
                        if n == space:
                            break
                i += 1
            if best < 0:
                break
            row.append(best)
            placed.add(best)
            space -= best_len
        rows.append(row)
    return rows


def simulate_packing(
    lengths: list[int], rows: int, row_len: int, lookahead: int | None, fixed_width: bool = False
) -> dict[str, float]:
    """Run the Packer's plan over sample `lengths` in order (no data): micro-batches of `rows` rows
    until fewer than a batch's worth of samples is left. lookahead None = no packing (one sample
    per row). Rows are padded to the batch's longest row (or to `row_len` with fixed_width).

    Returns batches, samples, rows, padding (share of padded slots), fill (sample tokens over the
    rows x row_len budget), slots_per_sample, samples_per_row, peak_buffer (most samples held) and
    max_delay (most batches a sample is emitted later than a straight order at the same rate)."""
    buffer: list[int] = []  # sample indices held, in arrival order
    pulled = slots = tokens = samples = n_rows = batches = peak = 0
    max_delay = 0.0

    def length_at(i: int) -> int:
        nonlocal pulled
        while len(buffer) <= i:
            if pulled == len(lengths):
                raise _Exhausted
            buffer.append(pulled)
            pulled += 1
        return lengths[buffer[i]]

    while True:
        try:
            if lookahead is None:
                length_at(rows - 1)
                plan = [[i] for i in range(rows)]
            else:
                plan = best_fit_rows(length_at, rows, row_len, lookahead)
        except _Exhausted:
            break
        peak = max(peak, len(buffer))
        row_lens = [sum(lengths[buffer[i]] for i in row) for row in plan]
        slots += rows * (row_len if fixed_width else max(row_lens))
        tokens += sum(row_lens)
        taken = {i for row in plan for i in row}
        emitted = [buffer[i] for i in taken]
        samples += len(emitted)
        n_rows += rows
        batches += 1
        per_batch = samples / batches
        max_delay = max(max_delay, max((batches - 1) - s / per_batch for s in emitted))
        buffer[:] = [s for i, s in enumerate(buffer) if i not in taken]
    if not batches:
        raise ValueError(f"{len(lengths)} samples do not fill one batch of {rows} rows")
    return {
        "batches": batches,
        "samples": samples,
        "rows": n_rows,
        "padding": 1 - tokens / slots,
        "fill": tokens / (n_rows * row_len),
        "slots_per_sample": slots / samples,
        "samples_per_row": samples / n_rows,
        "peak_buffer": peak,
        "max_delay": max_delay,
    }


def skip_counts(counters: Mapping[str, int]) -> dict[str, int]:
    """Skipped samples per reason: the "skipped/" counters without their prefix."""
    return {k.split("/", 1)[1]: v for k, v in counters.items() if k.startswith("skipped/")}


class _Exhausted(Exception):
    pass


class Packer(BaseNode[Emitted]):
    """Turns the stream of processed/skipped samples into Batches, counting and logging skips.

    packing=True: rows of up to `row_len` tokens planned by `best_fit_rows` over a look-ahead of
    `lookahead` buffered samples (1 = greedy in order). packing=False: one sample per row; with
    `sampler_batches` (modality grouping, whose sampler deals single-modality batches of
    `batch_size`) a batch holds only samples of one sampler batch, so a skipped sample leaves its
    batch one row short instead of pulling the next batch's first sample in (which would shift
    every later batch and mix modalities). Either way a batch is padded at the end to its longest
    row. `reset(None)` restarts at `start_state`
    (set by the loader on resume); `reset(state)` repositions the whole upstream chain.
    """

    def __init__(
        self,
        source: BaseNode,
        sampler: DistributedSampleSampler,
        rematerialize: Callable[[SampleRef], ProcessedSample | SkippedSample],
        *,
        batch_size: int,
        row_len: int,
        pad_id: int,
        packing: bool,
        strict: bool,
        lookahead: int,
        sampler_batches: bool = False,
    ):
        super().__init__()
        if sampler_batches and packing:
            raise ValueError("sampler_batches applies to unpacked batches only")
        self.sampler_batches = sampler_batches
        self.source = source
        self.sampler = sampler
        self.rematerialize = rematerialize
        self.batch_size = batch_size
        self.row_len = row_len
        self.pad_id = pad_id
        self.packing = packing
        self.strict = strict
        self.lookahead = lookahead
        self.start_state: dict[str, Any] | None = None
        self._buffer: list[ProcessedSample] = []
        self._sampler_state: dict[str, int] = {}
        self.counters: Counter = Counter()

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        state = initial_state if initial_state is not None else self.start_state
        self._buffer = []
        self.counters = Counter()
        if state is None:
            self.sampler.start_state = None
            self._sampler_state = {"epoch": 0, "position": 0}
        else:
            self.sampler.start_state = dict(state["sampler"])
            self._sampler_state = dict(state["sampler"])
            self.counters.update(state["counters"])
            for index, epoch, position in state["buffer"]:
                item = self.rematerialize(SampleRef(index, epoch, position))
                if isinstance(item, SkippedSample):
                    # The data changed since the checkpoint; the sample cannot be used any more.
                    self._count_skip(item)
                else:
                    self._buffer.append(item)
        self.source.reset(None)

    def get_state(self) -> dict[str, Any]:
        return {
            "sampler": dict(self._sampler_state),
            "buffer": [[s.ref.index, s.ref.epoch, s.ref.position] for s in self._buffer],
            "counters": dict(self.counters),
        }

    def _count_skip(self, item: SkippedSample) -> None:
        self.counters[f"skipped/{item.reason}"] += 1
        logger.warning(
            "skipping sample %r (index %d): %s: %s", item.sample_id, item.ref.index, item.reason, item.detail
        )

    def _pull(self) -> ProcessedSample | SkippedSample:
        """Next usable sample from upstream, counting (and in strict mode returning) skipped ones.
        A whole epoch of this rank's samples skipped in a row is an error, not an endless loop."""
        skipped_in_a_row = 0
        while True:
            item = next(self.source)
            self._sampler_state = {"epoch": item.ref.epoch, "position": item.ref.position}
            if isinstance(item, SkippedSample):
                self._count_skip(item)
                if self.strict:
                    return item
                skipped_in_a_row += 1
                epoch_len = self.sampler.samples_per_epoch()
                if skipped_in_a_row >= epoch_len:
                    raise ValueError(
                        f"data: none of the {skipped_in_a_row} samples in a row (a whole epoch of "
                        f"this rank's {epoch_len}) could be used; skipped so far: "
                        f"{skip_counts(self.counters)}. Check data.path, data.image_folder and data.template."
                    )
                continue
            self.counters["samples"] += 1
            self.counters.update(item.events)
            return item

    def _length_at(self, i: int) -> int:
        """Length of buffered sample `i`, pulling from upstream until the buffer holds it."""
        while len(self._buffer) <= i:
            item = self._pull()
            if isinstance(item, SkippedSample):
                raise _StrictStop(item)
            self._buffer.append(item)
        return len(self._buffer[i])

    def _sampler_batch(self, i: int) -> tuple[int, int]:
        ref = self._buffer[i].ref
        return ref.epoch, (ref.position - 1) // self.batch_size  # positions count from 1

    def _samples_of_first_sampler_batch(self) -> int:
        """How many buffered samples, from the oldest, came from the oldest one's sampler batch
        (pulling until the next batch's first sample arrives or the batch is whole)."""
        self._length_at(0)
        first = self._sampler_batch(0)
        n = 1
        while n < self.batch_size:
            self._length_at(n)
            if self._sampler_batch(n) != first:
                break
            n += 1
        return n

    def next(self) -> Emitted:
        try:
            if self.packing:
                plan = best_fit_rows(self._length_at, self.batch_size, self.row_len, self.lookahead)
            elif self.sampler_batches:
                plan = [[i] for i in range(self._samples_of_first_sampler_batch())]
            else:
                plan = [[i] for i in range(self.batch_size)]
                self._length_at(self.batch_size - 1)
        except _StrictStop as stop:
            item = stop.item
            return None, self.get_state(), (item.reason, item.detail, item.sample_id)
        rows = [[self._buffer[i] for i in row] for row in plan]
        taken = {i for row in plan for i in row}
        # What is left keeps its arrival order (the oldest starts the next row).
        self._buffer = [s for i, s in enumerate(self._buffer) if i not in taken]
        # Every batch is padded only to its longest row (packed rows are usually close to row_len).
        batch = collate_rows(rows, self.pad_id, None, self.packing)
        self.counters["batches"] += 1
        return batch, self.get_state(), None


class _StrictStop(Exception):
    def __init__(self, item: SkippedSample):
        super().__init__(item.reason)
        self.item = item
