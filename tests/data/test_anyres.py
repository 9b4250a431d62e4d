"""AnyRes pixel tiles and image-token counts against REFERENCE.md's literal procedure and transformers."""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from titan_llava.data.anyres import (
    CLIP_MEAN,
    CLIP_STD,
    LLAVA_NEXT_GRID_PINPOINTS,
    num_image_tokens,
    num_tiles,
    process_anyres_image,
    process_image,
)

# (width, height): every pinpoint's own size and aspect ratio (scaled), wide, tall, square, COCO-like,
# odd sizes, extreme ratios, tiny, large.
SIZES = [
    (336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008),
    (100, 200), (300, 150), (250, 250), (900, 300), (120, 360),
    (640, 480), (480, 640), (500, 375), (640, 427), (500, 500), (1024, 768),
    (333, 777), (1001, 337), (337, 1001),
    (2000, 50), (50, 2000), (1, 1), (2, 3), (3, 2), (3000, 2000),
]


def _random_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Noise over a gradient: every resize/filter/offset mistake changes many pixels."""
    w, h = size
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.int64)
    ramp = (np.arange(w)[None, :, None] * 7 + np.arange(h)[:, None, None] * 3) % 256
    return Image.fromarray(((noise + ramp) % 256).astype(np.uint8), mode="RGB")


# --- The literal reference procedure, written from REFERENCE.md (shares no code with the package) ---


def _ref_best_resolution(w: int, h: int, candidates) -> tuple[int, int]:
    best, best_eff, best_waste = None, -1, math.inf
    for cw, ch in candidates:
        s = min(cw / w, ch / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    return best


def _ref_normalise(tile: Image.Image, mean, std) -> np.ndarray:
    x = np.asarray(tile, dtype=np.float64) / 255.0
    return ((x - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def _ref_anyres(image: Image.Image, pinpoints, t: int = 336, mean=CLIP_MEAN, std=CLIP_STD):
    image = image.convert("RGB")
    w, h = image.size
    tw, th = _ref_best_resolution(w, h, pinpoints)
    sw, sh = tw / w, th / h
    if sw < sh:
        nw, nh = tw, min(math.ceil(h * sw), th)
    else:
        nw, nh = min(math.ceil(w * sh), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    tiles = [image.resize((t, t))]
    for y in range(0, th, t):
        for x in range(0, tw, t):
            tiles.append(canvas.crop((x, y, x + t, y + t)))
    return np.stack([_ref_normalise(tile, mean, std) for tile in tiles])


def _hf_processor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.models.llava_next.image_processing_pil_llava_next import (
            LlavaNextImageProcessorPil,
        )
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        # transformers lists pinpoints as [height, width]
        image_grid_pinpoints=[[h, w] for w, h in LLAVA_NEXT_GRID_PINPOINTS],
    )


@pytest.fixture(scope="module")
def hf_processor():
    return _hf_processor()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_anyres_matches_reference_and_transformers(size, hf_processor):
    image = _random_image(size, seed=size[0] * 7919 + size[1])
    ours = process_anyres_image(image, LLAVA_NEXT_GRID_PINPOINTS)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert ours.shape == (num_tiles(size), 3, 336, 336)

    ref = _ref_anyres(image, LLAVA_NEXT_GRID_PINPOINTS)
    assert ours.shape == ref.shape
    assert np.abs(ours.numpy().astype(np.float64) - ref).max() <= 1e-6

    hf = hf_processor(images=[image], return_tensors="np")
    hf_pixels = hf["pixel_values"][0]
    assert tuple(hf["image_sizes"][0]) == (size[1], size[0])  # transformers: (height, width)
    assert hf_pixels.shape == ours.shape
    # Same uint8 pixels and the same float32 arithmetic: bit-identical, not merely close.
    np.testing.assert_array_equal(ours.numpy(), hf_pixels)


def test_anyres_converts_non_rgb_like_reference():
    rgba = _random_image((400, 300), seed=1).convert("RGBA")
    grey = _random_image((300, 400), seed=2).convert("L")
    for image in (rgba, grey):
        ref = _ref_anyres(image, LLAVA_NEXT_GRID_PINPOINTS)
        ours = process_anyres_image(image, LLAVA_NEXT_GRID_PINPOINTS)
        assert np.abs(ours.numpy() - ref).max() <= 1e-6


def test_anyres_other_pinpoints_tile_size_and_stats():
    # A different tile size and grid set (picks the 2x2 grid at tile 224) with non-CLIP statistics.
    pinpoints = [(224, 448), (448, 224), (448, 448)]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    image = _random_image((700, 380), seed=3)
    ours = process_anyres_image(image, pinpoints, tile_size=224, mean=mean, std=std)
    ref = _ref_anyres(image, pinpoints, t=224, mean=mean, std=std)
    assert ours.shape == ref.shape == (5, 3, 224, 224)
    assert np.abs(ours.numpy() - ref).max() <= 1e-6


@pytest.mark.parametrize(
    "size, pinpoints, tile",
    [
        ((1000, 10), [(336, 1008)], 336),  # top and bottom tiles are entirely padding
        ((10, 1000), [(1008, 336)], 336),  # left and right tiles are entirely padding
        ((50, 300), [(28, 84), (84, 28)], 28),  # a custom tile size, partly padded tiles
    ],
)
def test_anyres_all_padding_tiles_and_custom_tile_size(size, pinpoints, tile):
    image = _random_image(size, seed=11)
    ours = process_anyres_image(image, pinpoints, tile_size=tile)
    ref = _ref_anyres(image, pinpoints, t=tile)
    assert ours.shape == ref.shape
    assert np.abs(ours.numpy() - ref).max() <= 1e-6


def test_anyres_tile_order_is_row_major_with_base_first():
    # A 2x2 canvas whose quadrants are flat colours: each tile must be one flat colour, in order.
    quads = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    canvas = Image.new("RGB", (672, 672))
    for i, colour in enumerate(quads):
        canvas.paste(colour, ((i % 2) * 336, (i // 2) * 336, (i % 2) * 336 + 336, (i // 2) * 336 + 336))
    tiles = process_anyres_image(canvas, LLAVA_NEXT_GRID_PINPOINTS)
    assert tiles.shape[0] == 5
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    for i, colour in enumerate(quads):
        expect = (torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255 - mean) / std
        assert torch.allclose(tiles[1 + i], expect.expand(3, 336, 336), atol=1e-6)
    # The base tile is the whole image squashed: it sees all four colours.
    assert tiles[0, 0, :100, :100].mean() > 1.5 and tiles[0, 2, -100:, :100].mean() > 1.5


def test_process_image_pad_and_resize_match_reference():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    fill = tuple(int(x * 255) for x in CLIP_MEAN)
    for size in [(640, 480), (480, 641), (500, 500), (2000, 50), (1, 1)]:
        image = _random_image(size, seed=size[0] + size[1])
        w, h = size
        side = max(w, h)
        square = Image.new("RGB", (side, side), fill)  # the reference's expand2square
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        ours_pad = process_image(image, "pad", LLAVA_NEXT_GRID_PINPOINTS)
        assert ours_pad.shape == (1, 3, 336, 336)
        expect_pad = clip(images=[square], return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(ours_pad.numpy(), expect_pad)

        ours_resize = process_image(image, "resize", LLAVA_NEXT_GRID_PINPOINTS)
        expect_resize = _ref_normalise(image.resize((336, 336)), CLIP_MEAN, CLIP_STD)[None]
        assert np.abs(ours_resize.numpy() - expect_resize).max() <= 1e-6

        ours_anyres = process_image(image, "anyres", LLAVA_NEXT_GRID_PINPOINTS)
        assert torch.equal(ours_anyres, process_anyres_image(image, LLAVA_NEXT_GRID_PINPOINTS))
    with pytest.raises(ValueError, match="squash"):
        process_image(image, "squash", LLAVA_NEXT_GRID_PINPOINTS)


# --- Image-token counts ---


def _hf_counts(size: tuple[int, int]) -> tuple[int, int]:
    """(processor's placeholder count, model's packed feature length) for one (width, height) image."""
    from transformers import LlavaNextConfig
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    w, h = size
    hf_pinpoints = [[ph, pw] for pw, ph in LLAVA_NEXT_GRID_PINPOINTS]
    processor = object.__new__(LlavaNextProcessor)  # only the counting methods are used
    processor.image_processor = types.SimpleNamespace(
        image_grid_pinpoints=hf_pinpoints, size={"shortest_edge": 336}
    )
    processor.patch_size = 14
    processor.num_additional_image_tokens = 1  # CLIP's class token ...
    processor.vision_feature_select_strategy = "default"  # ... which "default" drops
    processor._merge_kwargs = lambda **_: {"images_kwargs": {}}
    from_processor = processor._get_num_multimodal_tokens(image_sizes=[(h, w)]).num_image_tokens[0]

    config = LlavaNextConfig(image_grid_pinpoints=hf_pinpoints)
    config.vision_config.image_size, config.vision_config.patch_size = 336, 14
    model = types.SimpleNamespace(config=config)
    n = num_tiles(size)  # the tile count itself is checked by the pixel tests above
    features = [torch.zeros(n, 576, 1)]
    packed, lens = LlavaNextModel.pack_image_features(
        model, features, torch.tensor([[h, w]]), "default", image_newline=torch.zeros(1)
    )
    assert packed[0].shape[0] == int(lens[0])
    return from_processor, int(lens[0])


# (88, 55), (55, 176): the kept side is 14.999999999999998 in floating point (the reference rounds
# to 7 decimals before int(); without it one feature row / column too many is cut).
@pytest.mark.parametrize("size", SIZES + [(1280, 720), (720, 1280), (4000, 3), (577, 1153),
                                          (88, 55), (55, 176)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_num_image_tokens_matches_transformers(size):
    from_processor, from_model = _hf_counts(size)
    assert num_image_tokens(size, LLAVA_NEXT_GRID_PINPOINTS) == from_processor == from_model


def test_num_image_tokens_reference_example_and_single_tile_modes():
    assert num_image_tokens((640, 480)) == 576 + 36 * 49 == 2340
    assert num_image_tokens((640, 480), aspect_ratio="pad") == 576
    assert num_tiles((640, 480), aspect_ratio="resize") == 1


def test_normalisation_statistics_are_openai_clips():
    """The tests above take CLIP_MEAN/CLIP_STD from the package itself: pin them to transformers'."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and CLIP_STD == tuple(OPENAI_CLIP_STD)
