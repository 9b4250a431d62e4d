"""Rows and batches from processed samples: greedy packing (or one sample per row) + collation.

The Packer node is the pipeline's stateful core: its state (sampler position after the last sample
it consumed, the refs of samples it holds but has not emitted, and the counters) is small, holds no
tensors, and on load re-materialises the held samples by processing them again.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Iterator

import torch
from torchdata.nodes import BaseNode

from titan_llava.constants import IGNORE_INDEX
from titan_llava.data.batch import Batch
from titan_llava.data.processing import ProcessedSample, SkippedSample
from titan_llava.data.sampler import DistributedSampleSampler, SampleRef

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
    return Batch(
        input_ids=input_ids,
        labels=labels,
        positions=positions,
        document_ids=document_ids,
        pixel_values=torch.cat(tiles) if tiles else None,
        image_sizes=torch.tensor(sizes, dtype=torch.long) if sizes else None,
        sample_ids=[[s.sample_id for s in row] for row in rows],
    )


def greedy_rows(
    lengths: Iterator[int] | list[int], num_rows: int, max_seq_len: int
) -> tuple[list[int], int]:
    """Greedy packing of a length stream into `num_rows` rows of at most `max_seq_len` tokens.

    A sample that does not fit the current row starts the next one. Returns the number of samples
    in each row and how many lengths were consumed; stops as soon as `num_rows` rows are closed.
    """
    rows: list[int] = []
    count, used, consumed = 0, 0, 0
    for n in lengths:
        assert 0 < n <= max_seq_len
        if count and used + n > max_seq_len:
            rows.append(count)
            count, used = 0, 0
            if len(rows) == num_rows:
                return rows, consumed
        count, used, consumed = count + 1, used + n, consumed + 1
        if used == max_seq_len:
            rows.append(count)
            count, used = 0, 0
            if len(rows) == num_rows:
                return rows, consumed
    raise AssertionError("the sample stream ended (it is infinite)")


class Packer(BaseNode[Emitted]):
    """Turns the stream of processed/skipped samples into Batches, counting and logging skips.

    packing=True: rows of exactly max_seq_len tokens (greedy, end padding). packing=False: one sample
    per row, padded to the longest row of the batch. `reset(None)` restarts at `start_state`
    (set by the loader on resume); `reset(state)` repositions the whole upstream chain.
    """

    def __init__(
        self,
        source: BaseNode,
        sampler: DistributedSampleSampler,
        rematerialize: Callable[[SampleRef], ProcessedSample | SkippedSample],
        *,
        batch_size: int,
        max_seq_len: int,
        pad_id: int,
        packing: bool,
        strict: bool,
    ):
        super().__init__()
        self.source = source
        self.sampler = sampler
        self.rematerialize = rematerialize
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.packing = packing
        self.strict = strict
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
        """Next usable sample from upstream, counting (and in strict mode returning) skipped ones."""
        while True:
            item = next(self.source)
            self._sampler_state = {"epoch": item.ref.epoch, "position": item.ref.position}
            if isinstance(item, SkippedSample):
                self._count_skip(item)
                if self.strict:
                    return item
                continue
            self.counters["samples"] += 1
            self.counters.update(item.events)
            return item

    def _lengths(self) -> Iterator[int]:
        """Lengths of the buffered samples, pulling more from upstream as the packer asks."""
        i = 0
        while True:
            if i == len(self._buffer):
                item = self._pull()
                if isinstance(item, SkippedSample):
                    raise _StrictStop(item)
                self._buffer.append(item)
            yield len(self._buffer[i])
            i += 1

    def next(self) -> Emitted:
        try:
            if self.packing:
                row_counts, consumed = greedy_rows(self._lengths(), self.batch_size, self.max_seq_len)
            else:
                lengths = self._lengths()
                for _ in range(self.batch_size):
                    next(lengths)
                row_counts, consumed = [1] * self.batch_size, self.batch_size
        except _StrictStop as stop:
            item = stop.item
            return None, self.get_state(), (item.reason, item.detail, item.sample_id)
        taken, self._buffer = self._buffer[:consumed], self._buffer[consumed:]
        rows, start = [], 0
        for count in row_counts:
            rows.append(taken[start : start + count])
            start += count
        batch = collate_rows(rows, self.pad_id, self.max_seq_len if self.packing else None, self.packing)
        self.counters["batches"] += 1
        return batch, self.get_state(), None


class _StrictStop(Exception):
    def __init__(self, item: SkippedSample):
        super().__init__(item.reason)
        self.item = item
