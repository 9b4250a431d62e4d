"""Packing: greedy rows, per-document positions/ids, padding, image order; hand-written expectations."""

from __future__ import annotations

import torch

from titan_llava.constants import IGNORE_INDEX as IGN
from titan_llava.constants import IMAGE_TOKEN_INDEX as IMG
from titan_llava.data.packing import collate_rows, greedy_rows
from titan_llava.data.processing import ProcessedSample, expand_image_placeholders, truncation_point
from titan_llava.data.sampler import SampleRef

PAD = 0


def _sample(sid: str, ids: list[int], labels: list[int], n_images: int = 0) -> ProcessedSample:
    pixels = torch.stack([torch.full((3, 2, 2), float(hash(sid) % 97 + k)) for k in range(n_images)]) if n_images else None
    return ProcessedSample(
        ref=SampleRef(0, 0, 0), sample_id=sid, input_ids=torch.tensor(ids), labels=torch.tensor(labels),
        pixel_values=pixels, image_sizes=[(10 + k, 20 + k) for k in range(n_images)],
    )


def test_greedy_rows() -> None:
    # max 10: [4,5] | 6 does not fit -> [6,3] | [2,8] exactly full; the next 7 is not consumed.
    assert greedy_rows(iter([4, 5, 6, 3, 2, 8, 7]), 3, 10) == ([2, 2, 2], 6)
    # A row closed by an exact fit does not pull the next length.
    assert greedy_rows(iter([10, 1]), 1, 10) == ([1], 1)
    # The overflowing sample is left for the next call (consumed counts only placed samples).
    assert greedy_rows(iter([3, 3, 5]), 1, 8) == ([2], 2)


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
