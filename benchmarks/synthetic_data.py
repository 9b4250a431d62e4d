"""Synthetic LLaVA-format training data for the throughput benchmark: JPEGs whose sizes follow a
COCO/LAION-like mix (realistic AnyRes tile and unpadded token counts) and conversations with
LLaVA-558K-like (stage 1) or mix665k-like (stage 2, ~6% text-only) token lengths.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from titan_llava.constants import IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import LLAVA_NEXT_GRID_PINPOINTS, num_image_tokens, num_tiles
from titan_llava.data.conversation import tokenize_conversation
from titan_llava.data.tokenizer import Tokenizer

# (width, height, weight). Stage 1 (LAION/CC/SBU captions): web photos, many landscape 4:3/3:2,
# some squares, portraits and large originals. Stage 2 (mix665k): mostly COCO (640 on the long
# side), plus GQA/VG (500-800), OCR-VQA book covers (tall) and TextVQA (1024x768).
STAGE1_SIZES: list[tuple[int, int, float]] = [
    (500, 375, 0.20),
    (640, 480, 0.15),
    (500, 333, 0.10),
    (1024, 768, 0.10),
    (512, 512, 0.10),
    (375, 500, 0.08),
    (800, 533, 0.07),
    (1280, 720, 0.06),
    (300, 225, 0.06),
    (1600, 1200, 0.04),
    (336, 336, 0.04),
]
STAGE2_SIZES: list[tuple[int, int, float]] = [
    (640, 480, 0.30),
    (640, 427, 0.15),
    (480, 640, 0.10),
    (500, 375, 0.10),
    (800, 600, 0.10),
    (500, 333, 0.05),
    (333, 500, 0.05),
    (1024, 768, 0.08),
    (300, 475, 0.07),
]
_WORDS = [
    "a",
    "the",
    "man",
    "woman",
    "dog",
    "cat",
    "street",
    "car",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "people",
    "sitting",
    "standing",
    "table",
    "food",
    "plate",
    "window",
    "building",
    "sky",
    "tree",
    "grass",
    "water",
    "boat",
    "train",
    "bus",
    "bike",
    "picture",
    "shows",
    "image",
    "of",
    "in",
    "on",
    "with",
    "near",
    "two",
    "three",
    "white",
    "black",
    "wooden",
    "old",
    "young",
    "playing",
    "holding",
    "looking",
    "what",
    "is",
    "there",
    "how",
    "many",
    "where",
    "does",
    "color",
    "describe",
    "this",
    "scene",
    "detail",
    "answer",
    "question",
]
TOKENIZER_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "tests",
    "assets",
    "tokenizer",
    "tokenizer.model",
)


@dataclass
class SyntheticStats:
    samples: int
    text_only: int
    mean_tiles: float  # per image
    mean_image_tokens: float  # per image
    mean_text_tokens: float  # per sample after the template (BOS, system prompt, roles), no image


def _text(rng: random.Random, tok: Tokenizer, n_tokens: int) -> str:
    """Random words until the text encodes to >= n_tokens pieces (with our tokenizer)."""
    words: list[str] = []
    while len(tok.encode(" ".join(words))) < n_tokens:
        words.extend(rng.choice(_WORDS) for _ in range(max(1, (n_tokens - len(words)) // 3)))
    return " ".join(words)


def _write_images(
    folder: str, sizes: list[tuple[int, int, float]], per_size: int
) -> list[list[str]]:
    """per_size photo-like JPEGs (gradient + noise, quality 90) for every size; names per size."""
    nprng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    names: list[list[str]] = []
    for w, h, _ in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], axis=-1)
        group = []
        for k in range(per_size):
            pixels = np.clip(base + nprng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            name = f"images/{w}x{h}_{k}.jpg"
            Image.fromarray(pixels).save(os.path.join(folder, name), quality=90)
            group.append(name)
        names.append(group)
    return names


def make_records(
    stage: int,
    num_samples: int,
    seed: int = 0,
    images_per_size: int = 2,
    tokenizer: Tokenizer | None = None,
) -> tuple[list[dict], list[tuple[int, int] | None]]:
    """The LLaVA records of `write_dataset` (image names `images/<w>x<h>_<k>.jpg`) and each record's
    image size (None for text-only), without writing anything."""
    assert stage in (1, 2), stage
    rng = random.Random(seed)
    tok = tokenizer or Tokenizer(TOKENIZER_PATH)
    sizes = STAGE1_SIZES if stage == 1 else STAGE2_SIZES
    weights = [s[2] for s in sizes]
    records: list[dict] = []
    image_sizes: list[tuple[int, int] | None] = []
    for i in range(num_samples):
        has_image = stage == 1 or rng.random() >= 0.06
        rec: dict = {"id": f"synth-{stage}-{i:06d}"}
        if has_image:
            k = rng.choices(range(len(sizes)), weights)[0]
            w, h = sizes[k][:2]
            rec["image"] = f"images/{w}x{h}_{rng.randrange(images_per_size)}.jpg"
            image_sizes.append((w, h))
        else:
            image_sizes.append(None)
        if stage == 1:
            rec["conversations"] = [
                {
                    "from": "human",
                    "value": "<image>\nRender a clear and concise summary of the photo.",
                },
                {"from": "gpt", "value": _text(rng, tok, rng.randint(6, 20))},
            ]
        else:
            total = rng.randint(40, 220) if has_image else rng.randint(600, 1600)
            rounds = rng.randint(1, 4)
            conv = []
            for r in range(rounds):
                q = _text(rng, tok, max(4, total // rounds // 5))
                if r == 0 and has_image:
                    q = "<image>\n" + q
                conv.append({"from": "human", "value": q})
                conv.append(
                    {"from": "gpt", "value": _text(rng, tok, max(8, total // rounds * 4 // 5))}
                )
            rec["conversations"] = conv
        records.append(rec)
    return records, image_sizes


def token_lengths(
    records: list[dict],
    image_sizes: list[tuple[int, int] | None],
    stage: int,
    max_seq_len: int,
    tokenizer: Tokenizer | None = None,
) -> list[int]:
    """Each record's training length in tokens (template text + AnyRes image tokens, truncated to
    `max_seq_len`): the row length the data pipeline gives it."""
    tok = tokenizer or Tokenizer(TOKENIZER_PATH)
    template = "plain" if stage == 1 else "vicuna_v1"
    lengths = []
    for rec, size in zip(records, image_sizes):
        ids, _ = tokenize_conversation(rec["conversations"], tok, template, size is not None)
        n = sum(1 for t in ids if t != IMAGE_TOKEN_INDEX)
        if size is not None:
            n += num_image_tokens(size, LLAVA_NEXT_GRID_PINPOINTS)
        lengths.append(min(n, max_seq_len))
    return lengths


def write_dataset(
    folder: str,
    stage: int,
    num_samples: int,
    seed: int = 0,
    images_per_size: int = 2,
    tokenizer_path: str = TOKENIZER_PATH,
) -> tuple[str, SyntheticStats]:
    """Write `folder`/data.json (+ images/) for `stage` 1 or 2; returns (json path, stats).

    Stage 1: plain captions of 6-20 words' tokens (~16 text tokens after the template), one image
    each. Stage 2: vicuna_v1 chats of 1-4 rounds, 40-220 tokens of turns (~250 text tokens with
    system prompt and roles); 6% text-only chats of 600-1600 tokens of turns (ShareGPT-like)."""
    tok = Tokenizer(tokenizer_path)
    records, image_sizes = make_records(stage, num_samples, seed, images_per_size, tok)
    sizes = STAGE1_SIZES if stage == 1 else STAGE2_SIZES
    _write_images(folder, sizes, images_per_size)
    tiles = [num_tiles(s, LLAVA_NEXT_GRID_PINPOINTS) for s in image_sizes if s is not None]
    img_tokens = [num_image_tokens(s, LLAVA_NEXT_GRID_PINPOINTS) for s in image_sizes if s is not None]
    path = os.path.join(folder, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    template = "plain" if stage == 1 else "vicuna_v1"
    text_lens = []
    for r in records:
        ids, _ = tokenize_conversation(r["conversations"], tok, template, "image" in r)
        text_lens.append(sum(1 for t in ids if t != IMAGE_TOKEN_INDEX))
    stats = SyntheticStats(
        samples=num_samples,
        text_only=sum(1 for s in image_sizes if s is None),
        mean_tiles=float(np.mean(tiles)) if tiles else 0.0,
        mean_image_tokens=float(np.mean(img_tokens)) if img_tokens else 0.0,
        mean_text_tokens=float(np.mean(text_lens)),
    )
    return path, stats
