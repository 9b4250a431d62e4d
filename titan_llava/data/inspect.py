"""Scan a LLaVA dataset and report counts, problems by reason and token lengths (after image expansion).

python -m titan_llava.data.inspect --data-path P --image-folder F --tokenizer T --template vicuna_v1
    [--max-seq-len 4096] [--limit N] [--config X.toml] [--decode-images]
    [--packing --packing-row-len R --packing-lookahead K --local-batch-size B]
Image sizes come from file headers (fast); --decode-images fully decodes to also catch corrupt pixels.
With packing (flag or the config's data.packing) it also estimates the packed rows of one epoch
(the packer's own plan over the lengths in a seeded shuffled order), from which training.steps
follows: steps = ceil(epochs x rows / training.global_batch_size).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from typing import Any, Sequence

import numpy as np

from titan_llava.constants import IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import LLAVA_NEXT_GRID_PINPOINTS, num_image_tokens
from titan_llava.data.conversation import tokenize_conversation
from titan_llava.data.dataset import LlavaDataset
from titan_llava.data.errors import BadSampleError
from titan_llava.data.images import load_image, read_image_size
from titan_llava.data.packing import simulate_packing
from titan_llava.data.processing import _image_paths
from titan_llava.data.tokenizer import Tokenizer


def _distribution(values: Sequence[int]) -> str:
    if not values:
        return "n/a"
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return (
        f"min {arr.min():.0f}  mean {arr.mean():.1f}  p50 {p50:.0f}  p90 {p90:.0f}  "
        f"p99 {p99:.0f}  max {arr.max():.0f}"
    )


def scan(
    dataset: LlavaDataset,
    tokenizer: Tokenizer,
    template: str,
    image_folder: str | None,
    max_seq_len: int,
    image_aspect_ratio: str = "anyres",
    grid_pinpoints: Sequence[Sequence[int]] | None = None,
    image_size: int = 336,
    patch_size: int = 14,
    limit: int | None = None,
    decode_images: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Statistics over the first `limit` samples (all by default), as a dict (see `format_report`)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    problems: Counter = Counter()
    events: Counter = Counter()
    text_lens, image_lens, total_lens = [], [], []
    num_images = text_only = 0
    t0 = last = time.monotonic()
    for i in range(n):
        if progress and time.monotonic() - last > 2.0:
            last = time.monotonic()
            print(f"scanned {i}/{n} samples ({last - t0:.0f}s)", file=sys.stderr)
        try:
            record = dataset.read_record(i)
            paths = _image_paths(record)
            if "conversations" not in record:
                raise BadSampleError("bad_conversation", "no 'conversations'")
            ids, _ = tokenize_conversation(
                record["conversations"], tokenizer, template, bool(paths), events, max_length=max_seq_len
            )
            markers = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
            if markers != len(paths):
                raise BadSampleError("image_count_mismatch", f"{markers} markers, {len(paths)} images")
            if paths and image_folder is None:
                raise BadSampleError("image_missing", "no image folder")
            image_tokens = 0
            for path in paths:
                size = load_image(image_folder, path).size if decode_images else read_image_size(image_folder, path)
                image_tokens += num_image_tokens(size, grid_pinpoints, image_size, patch_size, image_aspect_ratio)
        except BadSampleError as e:
            problems[e.reason] += 1
            continue
        num_images += len(paths)
        text_only += not paths
        text_lens.append(len(ids) - len(paths))
        image_lens.append(image_tokens)
        total_lens.append(len(ids) - len(paths) + image_tokens)
    return {
        "samples": n,
        "usable": len(total_lens),
        "images": num_images,
        "text_only": text_only,
        "problems": dict(problems),
        "tokenization_mismatch": events["tokenization_mismatch"],
        "text": text_lens,
        "image": [x for x in image_lens if x],
        "total": total_lens,
        "over_max_seq_len": sum(1 for x in total_lens if x > max_seq_len),
        "max_seq_len": max_seq_len,
    }


def format_report(stats: dict[str, Any]) -> str:
    lines = [
        f"samples: {stats['samples']}  usable: {stats['usable']}  images: {stats['images']}  "
        f"text-only samples: {stats['text_only']}",
        "problems: " + (", ".join(f"{k}={v}" for k, v in sorted(stats["problems"].items())) or "none"),
        f"tokenization mismatches (whole sample masked): {stats['tokenization_mismatch']}",
        f"text tokens:  {_distribution(stats['text'])}",
        f"image tokens (samples with images): {_distribution(stats['image'])}",
        f"total tokens: {_distribution(stats['total'])}",
        f"longer than max_seq_len {stats['max_seq_len']} (truncated): {stats['over_max_seq_len']}",
    ]
    return "\n".join(lines)


def packing_estimate(
    lengths: Sequence[int], rows: int, row_len: int, lookahead: int, seed: int = 0
) -> dict[str, float]:
    """`simulate_packing` over `lengths` in a seeded shuffled order (training order is shuffled
    too), for a single data-parallel rank, plus `epoch_rows`: the epoch's tokens over the simulated
    tokens per row (the data stream wraps into the next epoch, so an epoch has no ragged end),
    and `epoch_samples_per_row`."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    est = simulate_packing(order, rows, row_len, lookahead)
    est["epoch_rows"] = math.ceil(sum(order) / (est["fill"] * row_len))
    est["epoch_samples_per_row"] = len(order) / est["epoch_rows"]
    return est


def format_packing(est: dict[str, float], row_len: int, lookahead: int, global_batch_size: int | None) -> str:
    line = (
        f"packing (rows of {row_len} tokens, lookahead {lookahead}): ~{est['epoch_rows']:,} rows per epoch, "
        f"{est['epoch_samples_per_row']:.2f} samples per row, {est['fill']:.1%} of row tokens used, "
        f"{est['padding']:.1%} padding"
    )
    if global_batch_size and global_batch_size > 0:
        line += (
            f"\n  at training.global_batch_size {global_batch_size} rows: ~{math.ceil(est['epoch_rows'] / global_batch_size):,} "
            f"steps per epoch (~{global_batch_size * est['epoch_samples_per_row']:.0f} samples per step)"
        )
    return line


def _resolved_architecture(cfg: Any) -> dict[str, Any]:
    """The image settings of the architecture the trainer resolves from `cfg` (the starting
    checkpoint's config.json / model_args.json, else the flavor, then [model] on top). Where the
    starting checkpoint cannot be read (e.g. not on this machine), the flavor's, with a warning."""
    from titan_llava.architecture import resolve_model_args
    from titan_llava.models.args import LLAVA_FLAVORS

    try:
        a = resolve_model_args(cfg)
    except (OSError, ValueError) as e:
        print(
            f"warning: could not resolve the architecture from checkpoint.initial_load_path ({e}); "
            f"image settings are those of flavor {cfg.model.flavor!r} and [model]",
            file=sys.stderr,
        )
        a = LLAVA_FLAVORS[cfg.model.flavor]
        pinpoints = cfg.model.grid_pinpoints or a.grid_pinpoints
        return {
            "image_aspect_ratio": cfg.model.image_aspect_ratio or a.image_aspect_ratio,
            "grid_pinpoints": [tuple(p) for p in pinpoints],
            "image_size": a.vision.image_size,
            "patch_size": a.vision.patch_size,
        }
    return {
        "image_aspect_ratio": a.image_aspect_ratio,
        "grid_pinpoints": a.grid_pinpoints,
        "image_size": a.vision.image_size,
        "patch_size": a.vision.patch_size,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titan_llava.data.inspect", description=__doc__)
    parser.add_argument("--config", help="TOML config; its [data] and [model] tables give defaults")
    parser.add_argument("--data-path")
    parser.add_argument("--image-folder")
    parser.add_argument("--tokenizer")
    parser.add_argument("--template", choices=["plain", "vicuna_v1"])
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--image-aspect-ratio", choices=["anyres", "pad", "resize"])
    parser.add_argument("--image-size", type=int, help="vision tile size in pixels (default 336)")
    parser.add_argument("--patch-size", type=int, help="vision patch size (default 14)")
    parser.add_argument("--limit", type=int, help="scan only the first N samples")
    parser.add_argument("--decode-images", action="store_true", help="fully decode every image")
    parser.add_argument("--packing", action="store_true", help="estimate packed rows per epoch")
    parser.add_argument("--packing-row-len", type=int, help="tokens per packed row (default: the config's data.packing_row_len, else max_seq_len)")
    parser.add_argument("--packing-lookahead", type=int, help="packer look-ahead (default: the config's, else 8)")
    parser.add_argument("--local-batch-size", type=int, help="rows per micro-batch (default: the config's training.local_batch_size, else 1)")
    parser.add_argument("--global-batch-size", type=int, help="rows per optimizer step")
    args = parser.parse_args(argv)

    data: dict[str, Any] = {}
    model: dict[str, Any] = {}
    training: dict[str, Any] = {}
    arch: dict[str, Any] = {}  # the architecture the trainer would resolve from the config
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.config:
        from titan_llava.config import load_config

        try:  # the trainer's own loading: unknown keys and wrong types are errors, defaults apply
            cfg = load_config(["--job.config_file", args.config])
        except ValueError as e:
            parser.error(str(e))
        sections = cfg.to_dict()
        data, model, training = sections["data"], sections["model"], sections["training"]
        arch = _resolved_architecture(cfg)
    settings = {
        "path": args.data_path or data.get("path"),
        "image_folder": args.image_folder or data.get("image_folder"),
        "tokenizer": args.tokenizer or model.get("tokenizer_path"),
        "template": args.template or data.get("template"),
        "max_seq_len": args.max_seq_len or data.get("max_seq_len", 4096),
        "image_aspect_ratio": args.image_aspect_ratio or arch.get("image_aspect_ratio", "anyres"),
        "image_size": args.image_size or arch.get("image_size", 336),
        "patch_size": args.patch_size or arch.get("patch_size", 14),
    }
    missing = [k for k in ("path", "tokenizer", "template") if not settings[k]]
    if missing:
        parser.error(f"missing settings: {', '.join(missing)} (give flags or --config)")
    pinpoints = arch.get("grid_pinpoints") or LLAVA_NEXT_GRID_PINPOINTS
    print(f"indexing {settings['path']} ...", file=sys.stderr)
    try:
        dataset = LlavaDataset(settings["path"], progress=True)
    except (OSError, ValueError) as e:
        parser.error(f"data path {settings['path']!r}: {e}")
    stats = scan(
        dataset,
        Tokenizer(settings["tokenizer"]),
        settings["template"],
        settings["image_folder"],
        int(settings["max_seq_len"]),
        settings["image_aspect_ratio"],
        pinpoints,
        int(settings["image_size"]),
        int(settings["patch_size"]),
        limit=args.limit,
        decode_images=args.decode_images,
    )
    print(format_report(stats))
    if args.packing or data.get("packing"):
        max_seq_len = int(settings["max_seq_len"])
        row_len = args.packing_row_len or data.get("packing_row_len", -1)
        row_len = max_seq_len if row_len == -1 else int(row_len)
        lookahead = args.packing_lookahead or int(data.get("packing_lookahead", 8))
        rows = args.local_batch_size or int(training.get("local_batch_size", 1))
        if row_len < max_seq_len:
            parser.error(f"--packing-row-len {row_len} is shorter than max_seq_len {max_seq_len}")
        lengths = [min(n, max_seq_len) for n in stats["total"]]
        est = packing_estimate(lengths, rows, row_len, lookahead)
        gbs = args.global_batch_size or training.get("global_batch_size")
        gbs = gbs if gbs and gbs > 0 else None  # -1: derived from the GPU count, unknown here
        print(format_packing(est, row_len, lookahead, gbs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
