"""Decode user images into the one canonical array the model pipeline uses.

The canonical image is an ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``, RGB channel order,
C-contiguous. Every entry point (bytes from a request, a file on disk, a numpy array from a Python
caller) ends in :func:`to_rgb_uint8`, so the rest of sam_core never sees another layout.

Decoding untrusted bytes is guarded: a byte limit, a pixel limit checked from the header *before*
any pixel data is decoded (decompression bombs), a short list of plain raster formats (no EPS and
other formats that shell out or parse vector data) and a forced full decode so truncated files fail
here instead of later.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam_core.errors import ImageDecodeError, ImageTooLarge, InvalidInput, NotFound

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest accepted ``width * height`` (also capped by ``PIL.Image.MAX_IMAGE_PIXELS`` when set)."""

SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "PPM")
"""PIL format names :func:`decode_image` accepts ("JPEG" also opens the MPO files phones write)."""

# What PIL raises for corrupt or truncated data, depending on the plugin.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def decode_image(
    data: bytes,
    *,
    max_bytes: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    field: str = "image",
) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, TIFF, BMP, GIF, WebP, PPM) into the canonical array.

    Returns a fresh, writable ``(H, W, 3)`` uint8 RGB C-contiguous array, with the EXIF orientation
    applied (so ``H, W`` are the *displayed* height and width) and only the first frame of an
    animated or multi-page file. Alpha is dropped (not composited); 16-bit and float images are
    windowed as described in :func:`to_rgb_uint8`.

    Raises:
        ImageTooLarge: more than ``max_bytes`` bytes, or ``width * height`` over ``max_pixels``
            (or over PIL's own ``Image.MAX_IMAGE_PIXELS``); detected from the header, before the
            pixel data is decoded.
        ImageDecodeError: empty input, unknown/unsupported format, corrupt or truncated data.
    """
    with open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field) as header:
        return header.decode()


class CheckedHeader:
    """An encoded image whose header has been read and checked against the limits, pixels not yet decoded.

    ``width`` and ``height`` are the stored size (before EXIF orientation); :meth:`decode` returns what
    :func:`decode_image` returns. Use it as a context manager (closing it frees the PIL image).
    """

    def __init__(self, im: Image.Image, field: str) -> None:
        self._im = im
        self._field = field
        self.width, self.height = im.size

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode(self) -> np.ndarray:
        """Decode the pixels into the canonical array (raises like :func:`decode_image`); closes the image."""
        try:
            _load(self._im, field=self._field)
            _apply_exif_orientation(self._im)
            array = _pil_to_array(self._im, field=self._field)
        finally:
            self._im.close()
        out = to_rgb_uint8(array, field=self._field)
        return out if out.flags.writeable else out.copy()

    def __enter__(self) -> CheckedHeader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._im.close()


def open_image(
    data: bytes,
    *,
    max_bytes: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    field: str = "image",
) -> CheckedHeader:
    """Read and check the header of encoded image bytes only (the first half of :func:`decode_image`): for a
    caller that needs the size before paying for the decode. Raises what :func:`decode_image` raises for the
    byte and pixel limits and for an unreadable header."""
    return CheckedHeader(_open_header(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field), field)


def load_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file and decode it with :func:`decode_image` (errors name the path as field).

    Returns the canonical ``(H, W, 3)`` uint8 RGB array. A missing file raises
    :class:`~sam_core.errors.NotFound`.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise NotFound(f"no such image file: {os.fspath(path)}", field=str(path)) from exc
    return decode_image(data, max_pixels=max_pixels, field=str(path))


def to_rgb_uint8(array: np.ndarray, *, field: str = "image") -> np.ndarray:
    """Canonicalise a numpy image to ``(H, W, 3)`` uint8 RGB, C-contiguous.

    Accepted shapes: ``(H, W)``, ``(H, W, 1)`` (grayscale, replicated to 3 channels), ``(H, W, 3)``
    and ``(H, W, 4)`` (the 4th channel is alpha and is dropped). Accepted dtypes:

    * ``uint8``: used as is.
    * ``bool``: ``False -> 0``, ``True -> 255``.
    * any other integer dtype (``uint16``, ``int32``, ...): linearly windowed from the image's own
      ``min..max`` (over all colour channels together) to ``0..255``; a constant image maps to 0.
    * float: values all within ``[0, 1]`` are scaled by 255, otherwise windowed like integers.
      NaN or infinity raises :class:`InvalidInput`.

    The input itself is returned (no copy) when it is already canonical.
    """
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"expected a numpy array, got {type(array).__name__}", field=field)
    if _is_canonical(array):
        return array
    color = _color_channels(array, field=field)
    gray_or_rgb = _to_uint8(color, field=field)
    if gray_or_rgb.ndim == 2:
        gray_or_rgb = np.repeat(gray_or_rgb[:, :, None], 3, axis=2)
    return np.ascontiguousarray(gray_or_rgb)


def _is_canonical(array: np.ndarray) -> bool:
    return (
        array.dtype == np.uint8
        and array.ndim == 3
        and array.shape[2] == 3
        and array.size > 0
        and array.flags.c_contiguous
    )


def image_content_hash(image: np.ndarray) -> str:
    """SHA-256 hex digest of an image's pixels (canonicalised with :func:`to_rgb_uint8` first).

    The digest covers a small header (shape and dtype) plus the raw bytes of the canonical
    ``(H, W, 3)`` uint8 array, so identical pixels give identical hashes whatever file format they
    were decoded from.
    """
    canonical = to_rgb_uint8(image)
    digest = hashlib.sha256(f"samforge-image:{canonical.shape}:{canonical.dtype.str}\n".encode())
    digest.update(canonical.data.cast("B"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# PIL helpers (also used by sam_core.io.masks for PNG masks)


def _open_image(
    data: bytes, *, max_bytes: int | None, max_pixels: int, field: str, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Open ``data`` with PIL, check the byte and pixel limits from the header, then fully decode.

    Returns a loaded PIL image (first frame). The caller closes it.
    """
    im = _open_header(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field, formats=formats)
    try:
        _load(im, field=field)
    except BaseException:
        im.close()
        raise
    return im


def _open_header(
    data: bytes, *, max_bytes: int | None, max_pixels: int, field: str, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Open ``data`` with PIL (the header only) and check the byte and pixel limits. The caller closes it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"expected encoded image bytes, got {type(data).__name__}", field=field)
    if len(data) == 0:
        raise ImageDecodeError("empty image data", field=field)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"{len(data)} bytes is over the limit of {max_bytes} bytes", field=field)
    allowed = _allowed_formats(formats or SUPPORTED_FORMATS)
    try:
        im = Image.open(io.BytesIO(data), formats=allowed)  # reads the header only
    except _BOMB_ERRORS as exc:
        raise ImageTooLarge(f"image is too large to decode ({exc})", field=field) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"not an image in a supported format ({', '.join(allowed)})", field=field
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot read image header: {exc}", field=field) from exc
    try:
        _check_pixels(im.size, max_pixels, field=field)
    except BaseException:
        im.close()
        raise
    return im


@functools.cache
def _allowed_formats(wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The subset of ``wanted`` this PIL build can open (``Image.open`` fails on unknown names)."""
    Image.init()
    return tuple(name for name in wanted if name in Image.OPEN)


def _check_pixels(size: tuple[int, int], max_pixels: int, *, field: str) -> None:
    """Reject ``size`` (width, height) over ``max_pixels`` or PIL's ``MAX_IMAGE_PIXELS``."""
    width, height = size
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, int(Image.MAX_IMAGE_PIXELS))
    if width * height > limit:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limit} pixels",
            field=field,
        )


def _load(im: Image.Image, *, field: str) -> None:
    """Force the full decode of the current frame so corrupt or truncated data fails here."""
    try:
        im.load()
    except _BOMB_ERRORS as exc:
        raise ImageTooLarge(f"image is too large to decode ({exc})", field=field) from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"corrupt or truncated image data: {exc}", field=field) from exc


def _apply_exif_orientation(im: Image.Image) -> None:
    """Rotate/flip ``im`` in place according to its EXIF Orientation tag, if any."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # nosec B110  # EXIF is advisory metadata: a broken block must not reject valid pixels
        pass


def _pil_to_array(im: Image.Image, *, field: str) -> np.ndarray:
    """PIL image -> numpy array in a layout :func:`to_rgb_uint8` accepts (dtype kept for 16-bit/float)."""
    mode = im.mode
    try:
        if mode in ("1", "L", "RGB", "RGBA", "I", "F") or mode.startswith("I;16"):
            return np.asarray(im)
        if mode == "LA":
            return np.asarray(im.getchannel(0))
        if mode in ("P", "PA"):
            has_alpha = mode == "PA" or "transparency" in im.info
            return np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
        return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, RGBX, RGBa, La, ...
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"unsupported image mode {mode!r}: {exc}", field=field) from exc


# --------------------------------------------------------------------------------------------------
# numpy helpers


def _color_channels(array: np.ndarray, *, field: str) -> np.ndarray:
    """Validate the shape and return an ``(H, W)`` or ``(H, W, 3)`` view (alpha / unit axis dropped)."""
    shape = array.shape
    valid = array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))
    if not valid or array.size == 0:
        raise InvalidInput(
            f"expected an image of shape HxW, HxWx1, HxWx3 or HxWx4 with H, W > 0, got shape {shape}",
            field=field,
        )
    if array.ndim == 2:
        return array
    if shape[2] == 1:
        return array[:, :, 0]
    return array[:, :, :3]


def _to_uint8(array: np.ndarray, *, field: str) -> np.ndarray:
    """Convert pixel values to uint8 (see :func:`to_rgb_uint8` for the rules per dtype)."""
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if kind in "iu":
        return _window(array)
    if kind == "f":
        if not np.isfinite(array).all():
            raise InvalidInput("image contains NaN or infinite values", field=field)
        low, high = array.min(), array.max()
        if low >= 0 and high <= 1:
            scaled: np.ndarray = array.astype(np.float32) * np.float32(255)
            np.rint(scaled, out=scaled)
            return scaled.astype(np.uint8)
        return _window(array)
    raise InvalidInput(f"unsupported image dtype {array.dtype}", field=field)


def _window(array: np.ndarray) -> np.ndarray:
    """Linearly map the array's own ``min..max`` to ``0..255`` (a constant array maps to 0)."""
    low, high = array.min(), array.max()
    if low == high:
        return np.zeros(array.shape, dtype=np.uint8)
    # float32 is exact for 16-bit data; wider integers and doubles keep float64 precision.
    work_dtype = np.float32 if array.dtype.itemsize <= 2 else np.float64
    work: np.ndarray = array.astype(work_dtype)
    work -= work_dtype(low)
    work *= work_dtype(255) / (work_dtype(high) - work_dtype(low))
    np.rint(work, out=work)
    np.clip(work, 0, 255, out=work)
    return work.astype(np.uint8)
