"""Safe image loading: paths confined to the image folder, full decode now, every failure a BadSampleError.

Decoding matches the reference (`Image.open(path).convert("RGB")`, no EXIF transpose, alpha dropped,
not composited) for 8-bit modes; 16-bit greyscale is rescaled to 8 bits instead of PIL's clipping.
"""

from __future__ import annotations

import os
import stat
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from titan_llava.data.errors import BadSampleError

# Largest image (width * height) that load_image decodes. PIL's own bomb check also applies, and
# its warning is made an error here, so the effective limit is min(max_pixels, PIL.Image.
# MAX_IMAGE_PIXELS ~ 89.5 MP unless the application raises it).
DEFAULT_MAX_PIXELS = 128 * 1024 * 1024

# Greyscale integer modes PIL's convert("RGB") would clip at 255 instead of rescaling.
_WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")

_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


def _bomb_warning_is_error() -> None:
    """Make PIL's DecompressionBombWarning an exception, process-wide (as Pillow's docs advise).

    A process-wide filter rather than `warnings.catch_warnings`: the latter swaps global state on
    enter/exit and corrupts it when loader threads interleave. Re-installed when missing because
    test runners reset the filter list between tests.
    """
    if _BOMB_FILTER not in warnings.filters:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def resolve_image_path(image_folder: str, relative_path: str) -> str:
    """Real path of `relative_path` inside `image_folder`; refuses anything that leaves the folder.

    Absolute paths, `..` that climbs out, and symlinks whose target lies outside the folder all raise
    BadSampleError("image_path_escape"); the check compares real (symlink-resolved) paths.
    """
    if not isinstance(relative_path, str) or not relative_path or "\x00" in relative_path:
        raise BadSampleError("image_path_invalid", f"image path {relative_path!r} is not a usable path")
    try:  # JSON can carry lone UTF-16 surrogates, which no file name holds
        os.fsencode(relative_path)
    except UnicodeEncodeError:
        raise BadSampleError(
            "image_path_invalid", f"image path {relative_path!r} is not valid Unicode"
        ) from None
    if os.path.isabs(relative_path):
        raise BadSampleError(
            "image_path_escape", f"image path {relative_path!r} is absolute; paths must be relative"
        )
    root = os.path.realpath(image_folder)
    path = os.path.realpath(os.path.join(root, relative_path))
    if os.path.commonpath([root, path]) != root:
        raise BadSampleError(
            "image_path_escape", f"image path {relative_path!r} resolves outside {image_folder!r}"
        )
    return path


def _open(
    image_folder: str, relative_path: str, max_pixels: int
) -> tuple[Image.Image, BinaryIO]:
    """Open (header only) the image; its size is checked against `max_pixels` before any decoding.

    The caller owns the returned file and closes it (closing the Image instead would also free
    the decoded pixels of an RGB image that is returned as is).
    """
    path = resolve_image_path(image_folder, relative_path)
    try:
        # Non-blocking, so that a FIFO opens (and is refused below) instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadSampleError("image_missing", f"{relative_path!r} not found in {image_folder!r}") from None
    except OSError as e:
        raise BadSampleError("image_unreadable", f"{relative_path!r}: {e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BadSampleError("image_missing", f"{relative_path!r} in {image_folder!r} is a directory")
        raise BadSampleError("image_unreadable", f"{relative_path!r} in {image_folder!r} is not a regular file")
    fp = os.fdopen(fd, "rb")
    try:
        if st.st_size == 0:
            raise BadSampleError("image_empty", f"{relative_path!r} is 0 bytes")
        _bomb_warning_is_error()
        try:
            image = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadSampleError("image_too_large", f"{relative_path!r}: {e}") from None
        except UnidentifiedImageError:
            raise BadSampleError("image_corrupt", f"{relative_path!r} is not a readable image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadSampleError("image_corrupt", f"{relative_path!r}: {type(e).__name__}: {e}") from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise BadSampleError("image_corrupt", f"{relative_path!r} has size {image.size}")
        if width * height > max_pixels:
            raise BadSampleError(
                "image_too_large",
                f"{relative_path!r} is {width}x{height} = {width * height} pixels > max {max_pixels}",
            )
    except BaseException:
        fp.close()
        raise
    return image, fp


def read_image_size(
    image_folder: str, relative_path: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """Original (width, height) from the file header alone, without decoding the pixels.

    Equals load_image(...).size: the reference applies no EXIF rotation, and neither do we.
    """
    image, fp = _open(image_folder, relative_path, max_pixels)
    fp.close()
    return image.size


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion as the reference's convert("RGB"), except 16/32-bit greyscale (rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _WIDE_INT_MODES:
        # PIL clips these to 255 (a 16-bit image turns almost white); map 0..65535 -> 0..255 instead.
        wide = np.asarray(image).astype(np.int64)
        grey = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")
    if mode == "P" and isinstance(image.info.get("transparency"), bytes):
        # Pixel colours do not depend on the transparency table; dropping it skips PIL's
        # "should be converted to RGBA" warning for a conversion whose RGB result is the same.
        image.info.pop("transparency")
    return image.convert("RGB")


def load_image(
    image_folder: str, relative_path: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Fully decoded RGB image at `relative_path` under `image_folder`.

    Raises BadSampleError with reason image_path_escape | image_path_invalid | image_missing |
    image_empty | image_unreadable | image_corrupt (not an image, truncated, decode error) |
    image_too_large (more than `max_pixels` pixels, or a PIL decompression bomb).
    """
    image, fp = _open(image_folder, relative_path, max_pixels)
    with fp:
        try:
            # Decode now: a truncated file fails here, inside the loader, not later in a worker.
            image.load()
            rgb = _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadSampleError("image_too_large", f"{relative_path!r}: {e}") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            raise BadSampleError(
                "image_corrupt", f"{relative_path!r}: {type(e).__name__}: {e}"
            ) from None
    assert rgb.mode == "RGB" and rgb.im is not None
    return rgb
