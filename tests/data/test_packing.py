"""Packing: best-fit rows (and greedy as lookahead 1), per-document positions/ids, padding, image
order; hand-written expectations."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from titan_llava.constants import IGNORE_INDEX as IGN
from titan_llava.constants import IMAGE_TOKEN_INDEX as IMG
from titan_llava.data.packing import best_fit_rows, collate_rows
from titan_llava.data.processing import ProcessedSample, expand_image_placeholders, truncation_point
from titan_llava.data.sampler import SampleRef

PAD = 0


def _sample(sid: str, ids: list[int], labels: list[int], n_images: int = 0) -> ProcessedSample:
    pixels = torch.stack([torch.full((3, 2, 2), float(hash(sid) % 97 + k)) for k in range(n_images)]) if n_images else None
    return ProcessedSample(
        ref=SampleRef(0, 0, 0), sample_id=sid, input_ids=torch.tensor(ids), labels=torch.tensor(labels),
        pixel_values=pixels, image_sizes=[(10 + k, 20 + k) for k in range(n_images)],
    )


def _plan(lengths: list[int], rows: int, row_len: int, lookahead: int) -> tuple[list[list[int]], int]:
    """(plan, how many samples the planner looked at: what the Packer pulls from upstream)."""
    asked = [0]

    def length_at(i: int) -> int:
        asked[0] = max(asked[0], i + 1)
        return lengths[i]

    return best_fit_rows(length_at, rows, row_len, lookahead), asked[0]


def test_lookahead_one_is_greedy_in_order() -> None:
    # max 10: [4,5] | 6 does not fit -> [6,3] | [2,8] exactly full; the 7 after them is not pulled.
    assert _plan([4, 5, 6, 3, 2, 8, 7], 3, 10, 1) == ([[0, 1], [2, 3], [4, 5]], 6)
    # A row closed by an exact fit does not pull the next sample.
    assert _plan([10, 1], 1, 10, 1) == ([[0]], 1)
    # The sample that did not fit was looked at (it stays buffered for the next batch).
    assert _plan([3, 3, 5, 1], 1, 8, 1) == ([[0, 1]], 3)


def test_best_fit_takes_the_longest_that_fits() -> None:
    # Row 1: 6, then of the window (5, 3, 4) the 4 fills it exactly.
    # Row 2: the oldest left (5), then of (3, 2, 9) the 3; space 2: the 2 fits exactly, and the
    # scan stops there (the 7 is never looked at).
    assert _plan([6, 5, 3, 4, 2, 9, 7], 2, 10, 3) == ([[0, 3], [1, 2, 4]], 6)
    # Ties go to the older sample; the window (3 unplaced samples after the placed ones) slides
    # on, so the 1 at index 5 stays out of reach.
    assert _plan([5, 2, 2, 9, 9, 1], 1, 8, 3) == ([[0, 1]], 5)
    # A window of 2 misses the 1 that a window of 4 finds.
    assert _plan([5, 9, 2, 9, 1, 9], 1, 8, 2) == ([[0, 2]], 4)
    assert _plan([5, 9, 2, 9, 1, 9], 1, 8, 4) == ([[0, 2, 4]], 5)


def test_oldest_sample_always_starts_a_row() -> None:
    # A long sample is never starved by shorter later ones: the next row starts with it.
    plan, _ = _plan([3, 8] + [3] * 10, 2, 10, 6)
    assert plan == [[0, 2, 3], [1]]


@pytest.mark.parametrize("lookahead", [1, 3, 8])
def test_plans_are_valid_on_random_lengths(lookahead: int) -> None:
    rng = random.Random(lookahead)
    lengths = [rng.randint(1, 50) for _ in range(400)]
    waiting = list(range(len(lengths)))  # the Packer's buffer: what a batch does not take stays
    emitted: list[int] = []
    for _ in range(20):
        plan = best_fit_rows(lambda i: lengths[waiting[i]], 3, 50, lookahead)
        placed: set[int] = set()
        for row in plan:
            assert sum(lengths[waiting[i]] for i in row) <= 50
            # Each row starts with the oldest sample not yet placed.
            assert row[0] == min(set(range(len(waiting))) - placed)
            assert not placed & set(row)  # a sample goes into one row only
            placed |= set(row)
            # The row closed because none of the next `lookahead` waiting samples fits any more.
            space = 50 - sum(lengths[waiting[i]] for i in row)
            window = [i for i in range(len(waiting)) if i not in placed][:lookahead]
            assert space == 0 or all(lengths[waiting[i]] > space for i in window)
        emitted += [waiting[i] for row in plan for i in row]
        waiting = [s for i, s in enumerate(waiting) if i not in placed]
    assert len(set(emitted)) == len(emitted)
    assert sorted(emitted + waiting) == list(range(len(lengths)))


def test_collate_packed_rows() -> None:
    a = _sample("a", [1, IMG, IMG, 7], [IGN, IGN, IGN, 7], n_images=1)
    b = _sample("b", [1, 8, 9], [IGN, 8, 9])
    c = _sample("c", [1, IMG, IMG, IMG, 5], [IGN, IGN, IGN, IGN, 5], n_images=2)
    batch = collate_rows([[a, b], [c]], pad_id=PAD, seq_len=8, packed=True)
    assert batch.input_ids.tolist() == [
        [1, IMG, IMG, 7, 1, 8, 9, PAD],
        [1, IMG, IMG, IMG, 5, PAD, PAD, PAD],
    ]
    assert batch.labels.tolist() == [
        [IGN, IGN, IGN, 7, IGN, 8, 9, IGN],
        [IGN, IGN, IGN, IGN, 5, IGN, IGN, IGN],
    ]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert torch.equal(batch.pixel_values, torch.cat([a.pixel_values, c.pixel_values]))
    assert batch.image_sizes.tolist() == [[10, 20], [10, 20], [11, 21]]
    assert batch.sample_ids == [["a", "b"], ["c"]]


def test_collate_unpacked_pads_to_longest() -> None:
    a = _sample("a", [1, 2, 3], [IGN, 2, 3])
    b = _sample("b", [1, 4], [IGN, 4])
    batch = collate_rows([[a], [b]], pad_id=PAD, seq_len=None, packed=False)
    assert batch.input_ids.tolist() == [[1, 2, 3], [1, 4, PAD]]
    assert batch.labels.tolist() == [[IGN, 2, 3], [IGN, 4, IGN]]
    assert batch.positions.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch.document_ids is None and batch.pixel_values is None and batch.image_sizes is None


def test_expand_and_truncate() -> None:
    ids, labels, spans = expand_image_placeholders([1, IMG, 5, IMG, 6], [IGN, IGN, 5, IGN, 6], [3, 2])
    assert ids == [1, IMG, IMG, IMG, 5, IMG, IMG, 6]
    assert labels == [IGN, IGN, IGN, IGN, 5, IGN, IGN, 6]
    assert spans == [(1, 4), (5, 7)]
    assert truncation_point(8, spans, 8) == (8, 2)
    assert truncation_point(8, spans, 7) == (7, 2)  # cut right after the second image
    assert truncation_point(8, spans, 6) == (5, 1)  # inside image 2 -> back to its start
    assert truncation_point(8, spans, 2) == (1, 0)  # inside image 1


def test_batch_to_and_pin() -> None:
    batch = collate_rows([[_sample("a", [1, IMG], [IGN, IGN], n_images=1)]], PAD, None, packed=False)
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.sample_ids == [["a"]]
    assert batch.num_images == 1 and batch.num_image_positions == 1 and batch.num_label_tokens == 0
    assert batch.to("cpu", sizes_on_host=True).image_sizes is batch.image_sizes
    # collate_rows sets the loss positions; a batch built without them gets the same ones.
    assert batch.loss_index.tolist() == [] and batch.with_loss_positions() is batch
    bare = dataclasses.replace(batch, labels=torch.tensor([[5, IGN]]), loss_index=None, loss_targets=None)
    filled = bare.with_loss_positions()
    assert filled.loss_index.tolist() == [] and filled.loss_targets.tolist() == []
    bare = dataclasses.replace(bare, labels=torch.tensor([[5, 7]]))
    assert bare.with_loss_positions().loss_index.tolist() == [0]
    assert bare.with_loss_positions().loss_targets.tolist() == [7]


def test_document_bounds_built_on_the_host_and_moved_with_the_batch() -> None:
    a = _sample("a", [1, 2, 3], [IGN, 2, 3])
    b = _sample("b", [4, 5], [IGN, 5])
    c = _sample("c", [6, 7, 8, 9], [IGN, 7, 8, 9])
    batch = collate_rows([[a, b], [c]], pad_id=PAD, seq_len=6, packed=True)
    # Row 0: documents of 3 and 2 tokens + 1 padding token; row 1: 4 tokens + 2 padding.
    bounded = batch.with_document_bounds()
    assert bounded.document_bounds.cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12]
    assert bounded.document_bounds.max_seqlen == 4
    assert bounded.with_document_bounds() is bounded
    moved = bounded.to("cpu")
    assert torch.equal(moved.document_bounds.cu_seqlens, bounded.document_bounds.cu_seqlens)
    assert moved.document_bounds.max_seqlen == 4
    # Unpacked batches have no document boundaries to build.
    flat = collate_rows([[a], [b]], pad_id=PAD, seq_len=None, packed=False)
    assert flat.with_document_bounds() is flat and flat.document_bounds is None


def test_collate_packed_loss_positions_stay_within_documents() -> None:
    """A document whose first label is learned: the previous document's last position must not
    predict it (collate_rows' loss positions follow the rows' document ids)."""
    a = _sample("a", [1, 2, 3], [IGN, 2, 3])
    b = _sample("b", [4, 5], [4, 5])  # first label learned (data that does not mask its BOS)
    batch = collate_rows([[a, b]], pad_id=PAD, seq_len=6, packed=True)
    assert batch.loss_index.tolist() == [0, 1, 3]
    assert batch.loss_targets.tolist() == [2, 3, 5]
