"""AnyRes (LLaVA-NeXT): best-resolution choice, tile grid, unpadding, image-token counts, pixel tiles.

The pure-geometry functions here are shared by the data pipeline (which must know each sample's
exact length before the model runs) and by the model (which packs the features the same way).
Sizes are always (width, height), as in PIL and in the LLaVA reference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# The LLaVA-NeXT recipe's pinpoints, (width, height): grids [[1,2],[2,1],[2,2],[3,1],[1,3]] x 336.
LLAVA_NEXT_GRID_PINPOINTS: list[tuple[int, int]] = [
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def select_best_resolution(
    size: tuple[int, int], candidates: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the candidate (width, height) that keeps the most of an image of `size` (width, height).

    Maximises the effective (downscaled, never upscaled beyond the original pixel count) resolution;
    ties go to the least wasted canvas area, then to the earlier candidate.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    best = None
    best_effective = -1
    best_wasted = float("inf")
    for cand in candidates:
        cw, ch = int(cand[0]), int(cand[1])
        scale = min(cw / width, ch / height)
        dw, dh = int(width * scale), int(height * scale)
        effective = min(dw * dh, width * height)
        wasted = cw * ch - effective
        if effective > best_effective or (
            effective == best_effective and wasted < best_wasted
        ):
            best, best_effective, best_wasted = (cw, ch), effective, wasted
    if best is None:
        raise ValueError("grid_pinpoints is empty")
    return best


def anyres_grid_shape(
    size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int = 336
) -> tuple[int, int]:
    """(rows, cols) of tiles that AnyRes cuts an image of `size` (width, height) into."""
    best_w, best_h = select_best_resolution(size, grid_pinpoints)
    if best_w % tile_size or best_h % tile_size:
        raise ValueError(
            f"grid pinpoint {(best_w, best_h)} is not a multiple of the tile size {tile_size}"
        )
    return best_h // tile_size, best_w // tile_size


def unpadded_feature_shape(
    size: tuple[int, int], grid_height: int, grid_width: int
) -> tuple[slice, slice]:
    """Rows and columns of a (grid_height, grid_width) feature map that hold real image content.

    AnyRes letterboxes the image onto its canvas; the model drops the feature rows (or columns) that
    only saw the black padding. The new size is rounded to 7 decimals before `int` (the robust form
    of the reference rule, immune to float error such as 0.9999999).
    """
    width, height = size
    if width / height > grid_width / grid_height:
        new_height = int(round(height * (grid_width / width), 7))
        pad = (grid_height - new_height) // 2
        return slice(pad, grid_height - pad), slice(0, grid_width)
    new_width = int(round(width * (grid_height / height), 7))
    pad = (grid_width - new_width) // 2
    return slice(0, grid_height), slice(pad, grid_width - pad)


def num_image_tokens(
    size: tuple[int, int],
    grid_pinpoints: Sequence[Sequence[int]] | None = None,
    tile_size: int = 336,
    patch_size: int = 14,
    aspect_ratio: str = "anyres",
) -> int:
    """Exact number of LLM positions one image of `size` (width, height) occupies.

    anyres: base tile + unpadded grid with one newline column per row; pad/resize: one tile.
    """
    per_side = tile_size // patch_size
    base = per_side * per_side
    if aspect_ratio in ("pad", "resize"):
        return base
    if aspect_ratio != "anyres":
        raise ValueError(f"unknown image aspect ratio mode {aspect_ratio!r}")
    if grid_pinpoints is None:
        grid_pinpoints = LLAVA_NEXT_GRID_PINPOINTS
    rows, cols = anyres_grid_shape(size, grid_pinpoints, tile_size)
    row_sl, col_sl = unpadded_feature_shape(size, rows * per_side, cols * per_side)
    kept_rows = row_sl.stop - row_sl.start
    kept_cols = col_sl.stop - col_sl.start
    return base + kept_rows * (kept_cols + 1)


def num_tiles(
    size: tuple[int, int],
    grid_pinpoints: Sequence[Sequence[int]] | None = None,
    tile_size: int = 336,
    aspect_ratio: str = "anyres",
) -> int:
    """Number of tiles (base included) the vision tower encodes for one image."""
    if aspect_ratio in ("pad", "resize"):
        return 1
    if grid_pinpoints is None:
        grid_pinpoints = LLAVA_NEXT_GRID_PINPOINTS
    rows, cols = anyres_grid_shape(size, grid_pinpoints, tile_size)
    return 1 + rows * cols


# ---------------------------------------------------------------------------------------------
# Pixel ops: PIL resizes exactly as the reference does (they define the pixels, and are most of the
# time); everything after them is one table lookup per output value, written straight into the
# preallocated output (no padded canvas, no per-tile PIL or per-tile normalisation calls).


@functools.lru_cache(maxsize=8)
def _normalize_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Read-only float32 [3, 256] table of CLIP-normalised values for each uint8 level of each channel.

    Computed with the reference's arithmetic (x * (1/255) in float64, rounded to float32, then
    (x - mean) / std in float32), so a table lookup gives bit-identical values to the reference's
    per-tile CLIP normalisation, at the cost of one gather.
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 channels, got mean={mean} std={std}")
    levels = (np.arange(256, dtype=np.float64) * (1.0 / 255.0)).astype(np.float32)
    mean_C1 = np.asarray(mean, dtype=np.float32)[:, None]
    std_C1 = np.asarray(std, dtype=np.float32)[:, None]
    lut_C256 = np.ascontiguousarray(
        (levels[None, :] - mean_C1) / std_C1, dtype=np.float32
    )
    lut_C256.flags.writeable = False
    return lut_C256


def _rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] read-only array of an RGB image: PIL's one packing copy, no second copy."""
    assert image.mode == "RGB", image.mode
    return np.asarray(image)


def _normalize_into(
    out_HW: np.ndarray, levels_HW: np.ndarray, lut_256: np.ndarray
) -> None:
    """out_HW[...] = lut_256[levels_HW] for one channel, without temporaries beyond numpy's index cast.

    mode="clip" is exact here (uint8 levels always index a 256-entry table) and, unlike the default
    "raise", lets numpy write straight into a C-contiguous `out_HW` instead of buffering it.
    """
    np.take(lut_256, levels_HW, out=out_HW, mode="clip")


def _as_rgb(image: Image.Image) -> Image.Image:
    # convert() copies even when the mode already matches; skip it then.
    return image if image.mode == "RGB" else image.convert("RGB")


def _letterbox_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the resized image inside a `target` letterbox, by the reference's rule."""
    width, height = size
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Letterbox `image` onto a black RGB canvas of `target` (width, height), as the reference does.

    The limiting side gets exactly its target; the other side is min(ceil(side * scale), target).
    PIL's default resize filter (bicubic) is used, then the resize is pasted at ((target - new) // 2).
    process_anyres_image produces the same tiles without building this canvas.
    """
    new_w, new_h = _letterbox_size(image.size, target)
    resized = image.resize((new_w, new_h))
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(resized, ((target[0] - new_w) // 2, (target[1] - new_h) // 2))
    return canvas


def _letterboxed_tile_into(
    out_CHW: np.ndarray, resized_HWC: np.ndarray, x0: int, y0: int, lut_C256: np.ndarray
) -> None:
    """Normalised tile whose top-left corner sits at (x0, y0) in `resized_HWC`'s coordinates.

    Tile pixels outside the resized image are the canvas's black padding (level 0 of each channel).
    """
    t = out_CHW.shape[-1]
    height, width = resized_HWC.shape[:2]
    ys, ye, xs, xe = max(y0, 0), min(y0 + t, height), max(x0, 0), min(x0 + t, width)
    covered = ye > ys and xe > xs
    for c in range(3):
        if not covered or (ye - ys, xe - xs) != (t, t):
            out_CHW[c].fill(lut_C256[c, 0])
        if covered:
            # Top/bottom padding keeps the destination rows contiguous (no numpy write-back buffer).
            _normalize_into(
                out_CHW[c, ys - y0 : ye - y0, xs - x0 : xe - x0],
                resized_HWC[ys:ye, xs:xe, c],
                lut_C256[c],
            )


def process_anyres_image(
    image: Image.Image,
    grid_pinpoints: Sequence[Sequence[int]] | None = None,
    tile_size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """AnyRes tiles of one image: float32 [1 + rows*cols, 3, tile, tile], base (whole image) first.

    The tiles come row-major from the letterboxed canvas at the best grid resolution; all values are
    CLIP-normalised, (x / 255 - mean) / std.
    """
    if grid_pinpoints is None:
        grid_pinpoints = LLAVA_NEXT_GRID_PINPOINTS
    image = _as_rgb(image)
    rows, cols = anyres_grid_shape(image.size, grid_pinpoints, tile_size)
    t = tile_size
    canvas_w, canvas_h = cols * t, rows * t
    new_w, new_h = _letterbox_size(image.size, (canvas_w, canvas_h))
    resized_HWC = _rgb_array(image.resize((new_w, new_h)))
    # The base view ignores the aspect ratio on purpose (the reference squashes the whole image).
    base_HWC = _rgb_array(image.resize((t, t)))
    lut_C256 = _normalize_lut(
        tuple(float(m) for m in mean), tuple(float(s) for s in std)
    )

    out_NCHW = np.empty((1 + rows * cols, 3, t, t), dtype=np.float32)
    for c in range(3):
        _normalize_into(out_NCHW[0, c], base_HWC[:, :, c], lut_C256[c])
    # Tile (r, col) is canvas[r*t:(r+1)*t, col*t:(col+1)*t]; the resized image sits at the
    # reference's paste offset on that canvas.
    off_x, off_y = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
    for r in range(rows):
        for col in range(cols):
            _letterboxed_tile_into(
                out_NCHW[1 + r * cols + col],
                resized_HWC,
                col * t - off_x,
                r * t - off_y,
                lut_C256,
            )
    return torch.from_numpy(out_NCHW)


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the short side symmetrically (extra pixel at the end) with `fill`: the reference's expand2square."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def process_image(
    image: Image.Image,
    aspect_ratio: str = "anyres",
    grid_pinpoints: Sequence[Sequence[int]] | None = None,
    tile_size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Tiles for one image under `aspect_ratio`: "anyres" -> [1+n, 3, t, t]; "pad"/"resize" -> [1, 3, t, t].

    "pad" squares the image with the mean colour (reference expand2square) before resizing to the tile;
    "resize" resizes to the tile ignoring the aspect ratio.
    """
    if aspect_ratio == "anyres":
        return process_anyres_image(image, grid_pinpoints, tile_size, mean, std)
    if aspect_ratio not in ("pad", "resize"):
        raise ValueError(
            f"unknown image aspect ratio mode {aspect_ratio!r} (anyres | pad | resize)"
        )
    image = _as_rgb(image)
    if aspect_ratio == "pad":
        image = expand_to_square(image, tuple(int(x * 255) for x in mean))
    tile_HWC = _rgb_array(image.resize((tile_size, tile_size)))
    lut_C256 = _normalize_lut(
        tuple(float(m) for m in mean), tuple(float(s) for s in std)
    )
    out_NCHW = np.empty((1, 3, tile_size, tile_size), dtype=np.float32)
    for c in range(3):
        _normalize_into(out_NCHW[0, c], tile_HWC[:, :, c], lut_C256[c])
    return torch.from_numpy(out_NCHW)
