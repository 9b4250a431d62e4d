"""Per-sample processing (runs in the loader's workers): record -> tokens with expanded image spans + tiles.

Every problem with one sample becomes a SkippedSample (id + reason), never an exception that kills
the run and never a substitute sample; the packer counts, logs, and (strict mode) raises.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from titan_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import CLIP_MEAN, CLIP_STD, num_image_tokens, num_tiles, process_image
from titan_llava.data.conversation import tokenize_conversation
from titan_llava.data.dataset import LlavaDataset
from titan_llava.data.errors import BadSampleError
from titan_llava.data.images import load_image
from titan_llava.data.sampler import SampleRef
from titan_llava.data.tokenizer import Tokenizer


@dataclass
class ProcessedSample:
    """One usable sample: expanded `input_ids`/`labels` [L] (L <= max_seq_len) and its images' tiles."""

    ref: SampleRef
    sample_id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None  # [T, 3, t, t], images in placeholder order
    image_sizes: list[tuple[int, int]]  # original (width, height) per kept image
    events: tuple[str, ...] = ()  # informational counters: truncated, tokenization_mismatch, ...

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class SkippedSample:
    ref: SampleRef
    sample_id: str
    reason: str
    detail: str


@dataclass(frozen=True)
class ProcessingConfig:
    image_folder: str | None
    template: str
    max_seq_len: int
    image_aspect_ratio: str = "anyres"
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    tile_size: int = 336
    patch_size: int = 14
    mean: tuple[float, ...] = field(default=CLIP_MEAN)
    std: tuple[float, ...] = field(default=CLIP_STD)


def _image_paths(record: dict) -> list[str]:
    if "image" not in record or record["image"] is None:
        return []
    value = record["image"]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise BadSampleError("malformed_record", f"'image' must be a path or a non-empty list of paths, got {value!r}")
    return paths


def expand_image_placeholders(
    input_ids: Sequence[int], labels: Sequence[int], tokens_per_image: Sequence[int]
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Replace the k-th IMAGE_TOKEN_INDEX by tokens_per_image[k] copies (labels IGNORE_INDEX).

    Returns the expanded ids, labels and each image's [start, end) span in them.
    """
    ids_out: list[int] = []
    labels_out: list[int] = []
    spans: list[tuple[int, int]] = []
    for token, label in zip(input_ids, labels):
        if token == IMAGE_TOKEN_INDEX:
            n = tokens_per_image[len(spans)]
            spans.append((len(ids_out), len(ids_out) + n))
            ids_out.extend([IMAGE_TOKEN_INDEX] * n)
            labels_out.extend([IGNORE_INDEX] * n)
        else:
            ids_out.append(token)
            labels_out.append(label)
    assert len(spans) == len(tokens_per_image)
    return ids_out, labels_out, spans


def truncation_point(length: int, spans: Sequence[tuple[int, int]], max_seq_len: int) -> tuple[int, int]:
    """(cut, images kept) for truncating a sequence to at most max_seq_len tokens.

    The reference cuts at max_seq_len even inside an image (the model then sees part of its
    features). Our model needs whole images, so a cut inside an image's span moves back to the span
    start: that image, its placeholders and everything after are dropped.
    """
    cut = min(length, max_seq_len)
    kept = 0
    for start, end in spans:
        if end <= cut:
            kept += 1
        else:
            cut = min(cut, start)
            break
    return cut, kept


class SampleProcessor:
    """Callable map function: SampleRef -> ProcessedSample | SkippedSample. Picklable (process workers)."""

    def __init__(self, dataset: LlavaDataset, tokenizer: Tokenizer, config: ProcessingConfig):
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.config = config

    def __call__(self, ref: SampleRef) -> ProcessedSample | SkippedSample:
        sample_id = str(ref.index)
        try:
            record = self.dataset.read_record(ref.index)
            sample_id = self.dataset.sample_id(record, ref.index)
            return self.process(record, ref, sample_id)
        except BadSampleError as e:
            return SkippedSample(ref, sample_id, e.reason, e.detail)
        except Exception as e:
            # Not a known kind of bad input: a bug, or a failure nobody anticipated. It stops the run
            # (it is not skipped silently), but names the sample: the resumed run reaches the same
            # sample again, and without its id nobody can tell which record to look at or exclude.
            raise RuntimeError(
                f"processing sample {sample_id!r} (index {ref.index} of {self.dataset.path!r}, "
                f"epoch {ref.epoch}) failed with {type(e).__name__}: {e}"
            ) from e

    def process(self, record: dict, ref: SampleRef, sample_id: str) -> ProcessedSample:
        cfg = self.config
        paths = _image_paths(record)
        if "conversations" not in record:
            raise BadSampleError("bad_conversation", "the record has no 'conversations'")
        stats: Counter = Counter()
        input_ids, labels = tokenize_conversation(
            record["conversations"], self.tokenizer, cfg.template, bool(paths), stats,
            max_length=cfg.max_seq_len, sample_id=sample_id,
        )
        num_markers = sum(1 for t in input_ids if t == IMAGE_TOKEN_INDEX)
        if num_markers != len(paths):
            raise BadSampleError(
                "image_count_mismatch", f"{num_markers} <image> marker(s) but {len(paths)} image(s)"
            )
        if paths and cfg.image_folder is None:
            raise BadSampleError("image_missing", "the sample has images but data.image_folder is not set")

        tiles, sizes, tokens_per_image = [], [], []
        for path in paths:
            image = load_image(cfg.image_folder, path)
            pixels = process_image(
                image, cfg.image_aspect_ratio, cfg.grid_pinpoints, cfg.tile_size, cfg.mean, cfg.std
            )
            size = image.size
            assert pixels.shape[0] == num_tiles(size, cfg.grid_pinpoints, cfg.tile_size, cfg.image_aspect_ratio)
            tiles.append(pixels)
            sizes.append(size)
            tokens_per_image.append(
                num_image_tokens(size, cfg.grid_pinpoints, cfg.tile_size, cfg.patch_size, cfg.image_aspect_ratio)
            )

        ids, labs, spans = expand_image_placeholders(input_ids, labels, tokens_per_image)
        events = ["tokenization_mismatch"] * stats["tokenization_mismatch"]
        if len(ids) > cfg.max_seq_len:
            cut, kept = truncation_point(len(ids), spans, cfg.max_seq_len)
            events.append("truncated")
            if kept < len(spans):
                events.append("truncated_image_dropped")
            ids, labs = ids[:cut], labs[:cut]
            tiles, sizes = tiles[:kept], sizes[:kept]
        if not ids:
            raise BadSampleError("empty_after_truncation", "nothing is left after truncation")
        return ProcessedSample(
            ref=ref,
            sample_id=sample_id,
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labs, dtype=torch.long),
            pixel_values=torch.cat(tiles) if tiles else None,
            image_sizes=sizes,
            events=tuple(events),
        )
