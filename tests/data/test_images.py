"""load_image / resolve_image_path: one test per bad-input kind, and RGB conversion vs the reference."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from titan_llava.data.errors import BadSampleError
from titan_llava.data.images import load_image, read_image_size, resolve_image_path


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _reference_rgb(path: str) -> np.ndarray:
    """What the reference trains on: Image.open(path).convert("RGB")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference lets PIL's palette warning through
        return np.asarray(Image.open(path).convert("RGB"))


def _reason(folder, rel, **kw) -> str:
    with pytest.raises(BadSampleError) as info:
        load_image(str(folder), rel, **kw)
    assert isinstance(info.value, ValueError)
    return info.value.reason


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- bad inputs ---


def test_missing_file_and_directory(tmp_path):
    assert _reason(tmp_path, "nope.jpg") == "image_missing"
    (tmp_path / "dir.jpg").mkdir()
    assert _reason(tmp_path, "dir.jpg") == "image_missing"


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _reason(tmp_path, "empty.jpg") == "image_empty"


def test_not_an_image_named_jpg(tmp_path):
    (tmp_path / "text.jpg").write_bytes(b"this is not a jpeg at all\n" * 20)
    assert _reason(tmp_path, "text.jpg") == "image_corrupt"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"full.{fmt.lower()}"
    _noise(200, 150).save(path, format=fmt)
    data = path.read_bytes()
    (tmp_path / f"half.{fmt.lower()}").write_bytes(data[: len(data) // 2])
    # The header is intact, so only a full decode can notice.
    assert read_image_size(str(tmp_path), f"half.{fmt.lower()}") == (200, 150)
    assert _reason(tmp_path, f"half.{fmt.lower()}") == "image_corrupt"
    assert load_image(str(tmp_path), f"full.{fmt.lower()}").size == (200, 150)


def test_dotdot_escape(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    _noise(8, 8).save(tmp_path / "secret.png")
    _noise(8, 8).save(folder / "ok.png")
    assert _reason(folder, "../secret.png") == "image_path_escape"
    assert _reason(folder, "sub/../../secret.png") == "image_path_escape"
    # `..` that stays inside the folder is fine.
    assert load_image(str(folder), "sub/../ok.png").size == (8, 8)


def test_sibling_folder_sharing_the_name_prefix_is_outside(tmp_path):
    """`images2/` starts with the string `images` but is not inside `images/`."""
    folder = tmp_path / "images"
    folder.mkdir()
    (tmp_path / "images2").mkdir()
    _noise(8, 8).save(tmp_path / "images2" / "secret.png")
    assert _reason(folder, "../images2/secret.png") == "image_path_escape"


def test_absolute_path(tmp_path):
    _noise(8, 8).save(tmp_path / "a.png")
    assert _reason(tmp_path, str(tmp_path / "a.png")) == "image_path_escape"


def test_invalid_path(tmp_path):
    assert _reason(tmp_path, "") == "image_path_invalid"
    assert _reason(tmp_path, "a\x00.png") == "image_path_invalid"


def test_symlinks(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    _noise(8, 8).save(outside / "x.png")
    _noise(9, 9).save(folder / "in.png")
    os.symlink(outside / "x.png", folder / "link_out.png")
    os.symlink(outside, folder / "dir_out")
    os.symlink(folder / "in.png", folder / "link_in.png")
    assert _reason(folder, "link_out.png") == "image_path_escape"
    assert _reason(folder, "dir_out/x.png") == "image_path_escape"
    assert load_image(str(folder), "link_in.png").size == (9, 9)
    assert resolve_image_path(str(folder), "link_in.png") == os.path.realpath(folder / "in.png")


def _png_with_declared_size(path, width: int, height: int) -> None:
    """A tiny valid-looking PNG whose header claims width x height (a decompression bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    # Above PIL's hard limit (DecompressionBombError).
    _png_with_declared_size(tmp_path / "huge.png", 20000, 20000)
    # In PIL's warning band: PIL only warns here, and the warning must not let the image through.
    side = int((limit * 1.1) ** 0.5)
    assert limit < side * side < 2 * limit
    _png_with_declared_size(tmp_path / "warn.png", side, side)
    for name in ("huge.png", "warn.png"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a warning that is merely shown would let it through
            assert _reason(tmp_path, name) == "image_too_large"
        assert not caught, [str(w.message) for w in caught]
    # Our own, configurable limit, checked from the header before decoding.
    _noise(40, 30).save(tmp_path / "small.png")
    assert _reason(tmp_path, "small.png", max_pixels=40 * 30 - 1) == "image_too_large"
    assert load_image(str(tmp_path), "small.png", max_pixels=40 * 30).size == (40, 30)


# --- mode conversions ---


def _save(image: Image.Image, path, **kw) -> str:
    image.save(path, **kw)
    return os.path.basename(path)


@pytest.mark.parametrize(
    "mode,ext",
    [("RGB", "jpg"), ("CMYK", "jpg"), ("CMYK", "tif"), ("L", "png"), ("LA", "png"), ("RGBA", "png"),
     ("P", "png"), ("P", "gif"), ("1", "png"), ("RGBA", "webp")],
)
def test_8bit_modes_match_reference(tmp_path, mode, ext):
    base = _noise(37, 23, seed=5)
    image = base.convert(mode) if mode != "P" else base.quantize(64)
    if mode in ("LA", "RGBA"):
        alpha = Image.fromarray(np.random.default_rng(6).integers(0, 256, (23, 37), dtype=np.uint8))
        image.putalpha(alpha)  # alpha must be dropped as the reference does, not composited
    name = _save(image, tmp_path / f"img.{ext}")
    with Image.open(tmp_path / name) as raw:
        assert raw.mode == mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = load_image(str(tmp_path), name)
    assert ours.mode == "RGB" and ours.size == (37, 23)
    np.testing.assert_array_equal(np.asarray(ours), _reference_rgb(str(tmp_path / name)))


@pytest.mark.parametrize("transparency", ["int", "bytes"])
def test_palette_with_transparency(tmp_path, transparency):
    image = _noise(30, 20, seed=7).quantize(16)
    if transparency == "int":
        name = _save(image, tmp_path / "p.png", transparency=3)
    else:
        name = _save(image, tmp_path / "p.png", transparency=bytes(range(0, 256, 16)))
    with Image.open(tmp_path / name) as raw:
        assert raw.mode == "P"
        assert isinstance(raw.info["transparency"], int if transparency == "int" else bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "should be converted to RGBA" warning must not fire
        ours = load_image(str(tmp_path), name)
    np.testing.assert_array_equal(np.asarray(ours), _reference_rgb(str(tmp_path / name)))


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_greyscale_is_rescaled_not_clipped(tmp_path, ext):
    levels = np.array([[0, 1, 128, 255, 256, 32767, 32768, 65280, 65534, 65535]], dtype=np.uint16)
    name = _save(Image.fromarray(levels), tmp_path / f"g16.{ext}")
    with Image.open(tmp_path / name) as raw:
        assert raw.mode.startswith("I")
    ours = np.asarray(load_image(str(tmp_path), name))
    expect = np.round(levels.astype(np.float64) * 255 / 65535).astype(np.uint8)[0]
    np.testing.assert_array_equal(ours[0], np.stack([expect] * 3, axis=1))
    # The deviation from the reference, on purpose: PIL clips, turning mid-grey (32768) white.
    assert _reference_rgb(str(tmp_path / name))[0, 6, 0] == 255 and ours[0, 6, 0] == 128


def test_32bit_integer_greyscale(tmp_path):
    levels = np.array([[-5, 0, 65535, 70000]], dtype=np.int32)
    name = _save(Image.fromarray(levels, mode="I"), tmp_path / "g32.tif")
    with Image.open(tmp_path / name) as raw:
        assert raw.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path), name))[0, :, 0], [0, 0, 255, 255])


# --- behaviour ---


def test_fully_decoded_and_no_fd_leaks(tmp_path):
    _noise(64, 48).save(tmp_path / "a.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"garbage" * 10)
    before = _open_fds()
    image = load_image(str(tmp_path), "a.jpg")
    for _ in range(3):
        with pytest.raises(BadSampleError):
            load_image(str(tmp_path), "bad.jpg")
        read_image_size(str(tmp_path), "a.jpg")
    assert _open_fds() == before
    os.remove(tmp_path / "a.jpg")
    assert np.asarray(image).shape == (48, 64, 3)  # usable with the file gone: decoded already


def test_read_image_size_matches_decode_with_exif_rotation(tmp_path):
    # An EXIF "rotate 90" tag: the reference ignores it, so both size and pixels stay as stored.
    exif = Image.Exif()
    exif[0x0112] = 6
    _noise(50, 20).save(tmp_path / "rot.jpg", exif=exif)
    assert read_image_size(str(tmp_path), "rot.jpg") == (50, 20)
    assert load_image(str(tmp_path), "rot.jpg").size == (50, 20)


def test_threads_share_loader_safely(tmp_path):
    _noise(64, 48).save(tmp_path / "ok.png")
    _png_with_declared_size(tmp_path / "bomb.png", 20000, 20000)
    (tmp_path / "bad.jpg").write_bytes(b"x" * 100)
    expected = np.asarray(load_image(str(tmp_path), "ok.png"))

    def work(i: int) -> str:
        name = ("ok.png", "bomb.png", "bad.jpg")[i % 3]
        try:
            assert np.array_equal(np.asarray(load_image(str(tmp_path), name)), expected)
            return "ok"
        except BadSampleError as e:
            return e.reason

    with ThreadPoolExecutor(4) as pool:
        reasons = list(pool.map(work, range(60)))
    assert reasons == ["ok", "image_too_large", "image_corrupt"] * 20
