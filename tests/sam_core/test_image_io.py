"""Tests for sam_core.io.images: every image is generated in memory."""

from __future__ import annotations

import io
import resource
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from sam_core.errors import ImageDecodeError, ImageTooLarge, InvalidInput, NotFound
from sam_core.io.images import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    image_content_hash,
    load_image,
    open_image,
    to_rgb_uint8,
)

# --------------------------------------------------------------------------------------------------
# helpers


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def random_rgb(height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def blocky_rgb() -> np.ndarray:
    """32 x 48 image of flat 16x16 blocks in distinct colours (survives 4:4:4 JPEG almost exactly)."""
    colours = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[255, 255, 0], [0, 255, 255], [255, 255, 255]]],
        dtype=np.uint8,
    )
    return np.repeat(np.repeat(colours, 16, axis=0), 16, axis=1)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def one_bit_png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of ``width x height`` that compresses to a few hundred KB at most.

    Built by hand: PIL would need ``width * height`` bytes of memory to save it (mode "1" stores a
    byte per pixel). The deflate stream repeats one fully flushed block of scanlines.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = 1000
    assert height % rows_per_block == 0
    block = row * rows_per_block
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert first[2:] == repeat  # after a full flush every block compresses identically
    adler = 1
    for _ in range(height // rows_per_block):
        adler = zlib.adler32(block, adler)
    final_empty_block = b"\x03\x00"
    stream = first + repeat * (height // rows_per_block - 1) + final_empty_block + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", stream)
        + png_chunk(b"IEND", b"")
    )


def assert_canonical(array: np.ndarray, height: int, width: int) -> None:
    assert isinstance(array, np.ndarray)
    assert array.shape == (height, width, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous


# --------------------------------------------------------------------------------------------------
# decode_image: formats and modes


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "PPM"])
def test_lossless_formats_round_trip_exactly(fmt: str) -> None:
    rgb = random_rgb()
    out = decode_image(encode(Image.fromarray(rgb), fmt))
    assert_canonical(out, 24, 40)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_close_to_source() -> None:
    rgb = blocky_rgb()
    out = decode_image(encode(Image.fromarray(rgb), "JPEG", quality=95, subsampling=0))
    assert_canonical(out, 32, 48)
    assert np.abs(out.astype(int) - rgb).max() <= 4


def test_result_is_writable() -> None:
    out = decode_image(encode(Image.fromarray(random_rgb()), "PNG"))
    assert out.flags.writeable
    out[0, 0] = 1


def test_grayscale_is_replicated() -> None:
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    out = decode_image(encode(Image.fromarray(gray), "PNG"))
    assert_canonical(out, 10, 20)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_one_bit_maps_to_0_and_255(fmt: str) -> None:
    bits = np.zeros((8, 16), dtype=bool)
    bits[2:5, 3:9] = True
    out = decode_image(encode(Image.fromarray(bits), fmt))
    np.testing.assert_array_equal(out[:, :, 0], np.where(bits, 255, 0))


def test_rgba_drops_alpha() -> None:
    rgba = np.dstack([random_rgb(), np.full((24, 40), 7, dtype=np.uint8)])
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out, rgba[:, :, :3])


def test_la_uses_luminance() -> None:
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    la = Image.merge("LA", [Image.fromarray(gray), Image.new("L", (10, 6), 0)])
    out = decode_image(encode(la, "PNG"))
    np.testing.assert_array_equal(out[:, :, 1], gray)


@pytest.mark.parametrize("transparency", [None, 0, b"\x80\xff"], ids=["opaque", "index", "alpha-bytes"])
def test_palette_with_and_without_transparency(transparency: int | bytes | None) -> None:
    indices = np.zeros((6, 8), dtype=np.uint8)
    indices[:, 4:] = 1
    im = Image.fromarray(indices, "P")
    im.putpalette([255, 0, 0, 0, 0, 255])
    params = {} if transparency is None else {"transparency": transparency}
    data = encode(im, "PNG", **params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a transparent palette goes straight to RGB
        out = decode_image(data)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])  # colour under the transparency is kept
    np.testing.assert_array_equal(out[0, 7], [0, 0, 255])


def test_cmyk_jpeg() -> None:
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(im, "JPEG", quality=95))
    assert_canonical(out, 16, 16)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() < 8


def test_ycbcr_tiff() -> None:
    rgb = blocky_rgb()
    ycbcr = Image.fromarray(rgb).convert("YCbCr")
    out = decode_image(encode(ycbcr, "TIFF"))
    np.testing.assert_array_equal(out, np.asarray(ycbcr.convert("RGB")))


def test_animated_gif_uses_first_frame() -> None:
    frames = []
    for index in range(3):
        frame = Image.new("P", (8, 6), index)
        frame.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
        frames.append(frame)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data)
    assert_canonical(out, 6, 8)
    assert (out == [255, 0, 0]).all()


# --------------------------------------------------------------------------------------------------
# 16-bit and float


def sixteen_bit_ramp() -> np.ndarray:
    return np.array([[1000, 2000, 4000], [1000, 3000, 4000]], dtype=np.uint16)


@pytest.mark.parametrize(("fmt", "dtype"), [("PNG", "<u2"), ("TIFF", ">u2"), ("TIFF", "<i4")])
def test_sixteen_bit_and_int_keep_dynamic_range(fmt: str, dtype: str) -> None:
    im = Image.fromarray(sixteen_bit_ramp().astype(dtype))
    assert im.mode in ("I;16", "I;16B", "I")
    out = decode_image(encode(im, fmt))
    expected = np.array([[0, 85, 255], [0, 170, 255]], dtype=np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], expected)


def test_sixteen_bit_png_opens_as_i16() -> None:
    data = encode(Image.fromarray(sixteen_bit_ramp()), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    assert len(np.unique(out)) == 4  # the high byte alone would give 3..15, clipping would give 255


@pytest.mark.parametrize(
    ("values", "expected"),
    [([[0.0, 0.5, 1.0]], [[0, 128, 255]]), ([[-5.0, 0.0, 5.0]], [[0, 128, 255]])],
)
def test_float_tiff(values: list[list[float]], expected: list[list[int]]) -> None:
    im = Image.fromarray(np.array(values, dtype=np.float32))
    assert im.mode == "F"
    out = decode_image(encode(im, "TIFF"))
    np.testing.assert_array_equal(out[:, :, 2], expected)


# --------------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(orientation: int, k: int) -> None:
    stored = blocky_rgb()  # 32 x 48
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    out = decode_image(data)
    expected = np.rot90(stored, k=k)  # 6: rotate 90 clockwise to display, 8: counter-clockwise
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).max() <= 4


def test_no_exif_keeps_layout() -> None:
    out = decode_image(encode(Image.fromarray(blocky_rgb()), "JPEG", quality=95))
    assert out.shape == (32, 48, 3)


# --------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS is not a supported format
    ],
    ids=["empty", "text", "png-signature-garbage", "eps"],
)
def test_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, field="request.image")
    assert info.value.field == "request.image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt: str) -> None:
    data = encode(Image.fromarray(random_rgb(64, 64)), fmt)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.field == "image"


def test_corrupt_png_data() -> None:
    data = bytearray(encode(Image.fromarray(random_rgb(64, 64)), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 200] = bytes(200)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bytes(data))
    assert info.value.field == "image"


def test_non_bytes_input() -> None:
    with pytest.raises(InvalidInput) as info:
        decode_image("image.png")  # type: ignore[arg-type]
    assert info.value.field == "image"


def test_byte_limit() -> None:
    data = encode(Image.fromarray(random_rgb()), "PNG")
    assert decode_image(data, max_bytes=len(data)).shape == (24, 40, 3)
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, max_bytes=len(data) - 1)
    assert info.value.field == "image"
    assert str(len(data) - 1) in str(info.value)


def test_pixel_limit_argument() -> None:
    data = encode(Image.fromarray(random_rgb()), "PNG")
    assert decode_image(data, max_pixels=24 * 40).shape == (24, 40, 3)
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, max_pixels=24 * 40 - 1, field="img")
    assert info.value.field == "img"
    assert "40x24" in str(info.value)


def test_bomb_under_pil_limit_is_rejected_before_pixels_load(monkeypatch: pytest.MonkeyPatch) -> None:
    data = one_bit_png_bomb(9000, 9000)  # 81 MP: over our 64 MP default, under PIL's 89 MP warning
    assert 9000 * 9000 > DEFAULT_MAX_PIXELS

    def fail_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was loaded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail_load)
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data)
    assert info.value.field == "image"
    assert "9000x9000" in str(info.value) and str(DEFAULT_MAX_PIXELS) in str(info.value)


def test_huge_bomb_is_rejected_quickly_without_memory() -> None:
    data = one_bit_png_bomb(30000, 30000)  # 900 MP (900 MB once decoded) in ~110 KB
    assert len(data) < 200_000
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, max_pixels=10**12)  # only PIL's own limit applies: its DecompressionBombError
    elapsed = time.perf_counter() - start
    peak_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kb) / 1024
    assert info.value.field == "image"
    assert elapsed < 1.0
    assert peak_growth_mb < 100


def test_pil_warning_limit_becomes_image_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.fromarray(random_rgb(30, 40)), "PNG")  # 1200 px: PIL warns (error above 2000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageTooLarge) as info:
        decode_image(data)
    assert info.value.field == "image" and "1000" in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLarge):
            decode_image(data)


def test_pil_error_limit_becomes_image_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageTooLarge) as info:
        decode_image(encode(Image.fromarray(random_rgb(30, 40)), "PNG"), field="x")
    assert info.value.field == "x"


def test_default_pil_limit_is_untouched() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge):
        decode_image(one_bit_png_bomb(9000, 9000))
    assert Image.MAX_IMAGE_PIXELS == before


# --------------------------------------------------------------------------------------------------
# load_image


def test_load_image(tmp_path: Path) -> None:
    rgb = random_rgb()
    path = tmp_path / "img.png"
    path.write_bytes(encode(Image.fromarray(rgb), "PNG"))
    np.testing.assert_array_equal(load_image(path), rgb)
    np.testing.assert_array_equal(load_image(str(path)), rgb)


def test_load_image_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.png"
    with pytest.raises(NotFound) as info:
        load_image(path)
    assert info.value.field == str(path)


def test_load_image_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"nope")
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.field == str(path)


def test_load_image_pixel_limit(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    path.write_bytes(encode(Image.fromarray(random_rgb()), "PNG"))
    with pytest.raises(ImageTooLarge) as info:
        load_image(path, max_pixels=10)
    assert info.value.field == str(path)


# --------------------------------------------------------------------------------------------------
# to_rgb_uint8


def test_canonical_input_is_returned_as_is() -> None:
    rgb = random_rgb()
    assert to_rgb_uint8(rgb) is rgb


def test_non_contiguous_input_is_made_contiguous() -> None:
    rgb = random_rgb()[:, ::2]
    out = to_rgb_uint8(rgb)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_accepted_shapes(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = to_rgb_uint8(array)
    assert_canonical(out, 5, 7)
    first = array if array.ndim == 2 else array[:, :, 0]
    np.testing.assert_array_equal(out[:, :, 0], first)


def test_bool_array() -> None:
    out = to_rgb_uint8(np.array([[True, False]]))
    np.testing.assert_array_equal(out[0, :, 1], [255, 0])


def test_uint16_array_windowed_and_constant_maps_to_zero() -> None:
    out = to_rgb_uint8(np.array([[1000, 4000]], dtype=np.uint16))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255])
    assert not to_rgb_uint8(np.full((3, 3), 5000, dtype=np.uint16)).any()


def test_rgba_uint16_windows_colour_channels_only() -> None:
    array = np.zeros((1, 2, 4), dtype=np.uint16)
    array[0, :, :3] = [[100, 100, 100], [200, 200, 200]]
    array[0, :, 3] = 65535  # alpha must not stretch the window
    np.testing.assert_array_equal(to_rgb_uint8(array)[0, :, 0], [0, 255])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_unit_range(dtype: type) -> None:
    out = to_rgb_uint8(np.array([[0.0, 0.25, 1.0]], dtype=dtype))
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 255])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_non_finite(bad: float) -> None:
    array = np.zeros((4, 4, 3), dtype=np.float32)
    array[1, 2, 0] = bad
    with pytest.raises(InvalidInput) as info:
        to_rgb_uint8(array, field="frame")
    assert info.value.field == "frame"


@pytest.mark.parametrize("shape", [(0, 5), (5, 0, 3), (4, 4, 2), (4, 4, 5), (2, 4, 4, 3), (7,)])
def test_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInput) as info:
        to_rgb_uint8(np.zeros(shape, dtype=np.uint8))
    assert info.value.field == "image"
    assert str(shape) in str(info.value)


@pytest.mark.parametrize(
    "array", [np.zeros((2, 2), dtype=object), np.zeros((2, 2), dtype=np.complex64), [[1]]]
)
def test_bad_types(array: object) -> None:
    with pytest.raises(InvalidInput) as info:
        to_rgb_uint8(array)  # type: ignore[arg-type]
    assert info.value.field == "image"


# --------------------------------------------------------------------------------------------------
# image_content_hash


def test_same_pixels_from_png_and_bmp_hash_equal() -> None:
    rgb = random_rgb()
    from_png = decode_image(encode(Image.fromarray(rgb), "PNG"))
    from_bmp = decode_image(encode(Image.fromarray(rgb), "BMP"))
    assert image_content_hash(from_png) == image_content_hash(from_bmp) == image_content_hash(rgb)
    assert len(image_content_hash(rgb)) == 64


def test_hash_changes_with_one_pixel_and_with_shape() -> None:
    rgb = random_rgb()
    changed = rgb.copy()
    changed[3, 4, 1] ^= 1
    assert image_content_hash(rgb) != image_content_hash(changed)
    flat = np.zeros((2, 6, 3), dtype=np.uint8)
    assert image_content_hash(flat) != image_content_hash(flat.reshape(6, 2, 3))


def test_hash_of_grayscale_equals_hash_of_replicated_rgb() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert image_content_hash(gray) == image_content_hash(np.dstack([gray] * 3))


def test_open_image_checks_the_header_before_any_pixel_is_decoded() -> None:
    data = encode(Image.fromarray(random_rgb(24, 40)), "PNG")
    truncated = data[: len(data) // 2]
    with open_image(truncated, max_pixels=24 * 40) as header:  # the header is whole: size known, limits pass
        assert (header.width, header.height, header.pixels) == (40, 24, 960)
        with pytest.raises(ImageDecodeError):
            header.decode()
    with pytest.raises(ImageTooLarge, match="960 pixels"):
        open_image(data, max_pixels=959)
    with open_image(data) as header:
        np.testing.assert_array_equal(header.decode(), decode_image(data))
