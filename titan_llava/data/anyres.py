"""AnyRes geometry (LLaVA-NeXT): best-resolution choice, tile grid, unpadding and image-token counts.

The pure-geometry functions here are shared by the data pipeline (which must know each sample's
exact length before the model runs) and by the model (which packs the features the same way).
Sizes are always (width, height), as in PIL and in the LLaVA reference.
"""

from __future__ import annotations

from typing import Sequence

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
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
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
