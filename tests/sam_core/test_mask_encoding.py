"""Tests for sam_core.io.masks: every mask is generated in-test."""

from __future__ import annotations

import io
import json
import time

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam_core.errors import ImageDecodeError, ImageTooLarge, InvalidInput
from sam_core.io.masks import (
    ENCODINGS,
    decode_png,
    decode_rle,
    encode_masks,
    encode_png,
    encode_rle,
    mask_area,
    mask_bbox,
    mask_to_polygons,
    polygons_to_mask,
)

# pycocotools' decode() trips a numpy 2 DeprecationWarning (its RLE object lacks __array__(copy=));
# the tests only use it as a reference implementation.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# --------------------------------------------------------------------------------------------------
# helpers


def rectangle(height: int = 40, width: int = 60) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[5:25, 10:50] = True
    return mask


def disk(size: int = 128, radius: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - size / 2) ** 2 + (xx - size / 2 - 7) ** 2 <= radius**2


def random_masks(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        height, width = rng.integers(1, 50, 2)
        masks.append(rng.random((height, width)) < rng.random())
    return masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def coco_rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


# --------------------------------------------------------------------------------------------------
# RLE


def test_rle_is_json_serialisable_coco_rle() -> None:
    rle = encode_rle(rectangle())
    assert rle["size"] == [40, 60]
    assert isinstance(rle["counts"], str)
    assert json.loads(json.dumps(rle)) == rle
    assert rle["counts"].encode() == coco_rle(rectangle())["counts"]


def test_rle_round_trip_random_masks_matches_pycocotools() -> None:
    for mask in random_masks(150):
        rle = encode_rle(mask)
        decoded = decode_rle(rle)
        assert decoded.dtype == bool and decoded.shape == mask.shape and decoded.flags.c_contiguous
        np.testing.assert_array_equal(decoded, mask)
        np.testing.assert_array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}), mask)


def test_rle_accepts_bytes_counts_and_non_contiguous_masks() -> None:
    mask = disk()[::2, 1::3]
    rle = encode_rle(mask)
    np.testing.assert_array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask)


def test_rle_accepts_uncompressed_counts() -> None:
    decoded = decode_rle({"size": [2, 3], "counts": [1, 2, 3]})  # column-major: 0, then 1 1, then 0 0 0
    np.testing.assert_array_equal(decoded, [[False, True, False], [True, False, False]])


def test_rle_area_matches_mask_sum() -> None:
    for mask in [rectangle(), disk(), *random_masks(20, seed=3)]:
        rle = encode_rle(mask)
        assert mask_utils.area({**rle, "counts": rle["counts"].encode()}) == mask.sum() == mask_area(mask)


def test_rle_empty_and_full_masks() -> None:
    for mask in (np.zeros((7, 9), dtype=bool), np.ones((7, 9), dtype=bool)):
        np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)
    assert encode_rle(np.zeros((7, 9), dtype=bool))["counts"] == coco_rle(np.zeros((7, 9)))["counts"].decode()


def test_rle_accepts_zero_one_integer_masks() -> None:
    assert encode_rle(rectangle().astype(np.uint8)) == encode_rle(rectangle())
    assert encode_rle(rectangle().astype(np.int64)) == encode_rle(rectangle())


@pytest.mark.parametrize(
    "rle",
    [
        "not a dict",
        {},
        {"size": [2, 2]},
        {"counts": "04"},
        {"size": [2], "counts": "04"},
        {"size": [2, -2], "counts": "04"},
        {"size": ["2", "2"], "counts": "04"},
        {"size": [2, 2], "counts": ""},  # pycocotools returns uninitialised memory for this
        {"size": [2, 2], "counts": "0"},  # runs too short
        {"size": [2, 2], "counts": "zz"},  # characters outside '0'..'o'
        {"size": [2, 2], "counts": "P"},  # ends inside a multi-character number
        {"size": [2, 2], "counts": "0:"},  # runs add up to more than 4
        {"size": [2, 2], "counts": "é"},
        {"size": [2, 2], "counts": 4},
        {"size": [2, 2], "counts": [1, -1, 4]},
        {"size": [2, 2], "counts": [1, 2]},
    ],
)
def test_malformed_rle(rle: object) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_rle(rle)  # type: ignore[arg-type]
    assert info.value.field == "rle"


def test_rle_size_limit() -> None:
    with pytest.raises(ImageTooLarge) as info:
        decode_rle({"size": [100_000, 100_000], "counts": "0"})
    assert info.value.field == "rle"
    with pytest.raises(ImageTooLarge):
        decode_rle(encode_rle(rectangle()), max_pixels=100)


# --------------------------------------------------------------------------------------------------
# PNG


def test_png_is_single_channel_0_255() -> None:
    data = encode_png(rectangle())
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and im.mode == "L"
    pixels = np.asarray(im)
    assert set(np.unique(pixels)) == {0, 255}
    np.testing.assert_array_equal(pixels == 255, rectangle())


def test_png_round_trip() -> None:
    for mask in [rectangle(), disk(), np.zeros((3, 4), dtype=bool), *random_masks(10)]:
        decoded = decode_png(encode_png(mask))
        assert decoded.dtype == bool
        np.testing.assert_array_equal(decoded, mask)


def test_decode_png_threshold_and_other_modes() -> None:
    gray = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, "PNG")
    np.testing.assert_array_equal(decode_png(buffer.getvalue()), [[False, False, True, True]])
    buffer = io.BytesIO()
    Image.fromarray(rectangle()).save(buffer, "PNG")  # 1-bit PNG
    np.testing.assert_array_equal(decode_png(buffer.getvalue()), rectangle())
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([rectangle().astype(np.uint8) * 255] * 3)).save(buffer, "PNG")
    np.testing.assert_array_equal(decode_png(buffer.getvalue()), rectangle())


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30])
def test_decode_png_errors(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_png(data, field="mask_input")
    assert info.value.field == "mask_input"


def test_decode_png_rejects_other_formats_and_size() -> None:
    buffer = io.BytesIO()
    Image.fromarray(rectangle().astype(np.uint8) * 255).save(buffer, "BMP")
    with pytest.raises(ImageDecodeError):
        decode_png(buffer.getvalue())
    with pytest.raises(ImageTooLarge) as info:
        decode_png(encode_png(rectangle()), max_pixels=100)
    assert info.value.field == "mask"


# --------------------------------------------------------------------------------------------------
# polygons


def test_rectangle_polygon_round_trip() -> None:
    polygons = mask_to_polygons(rectangle())
    assert len(polygons) == 1
    assert all(isinstance(value, float) for value in polygons[0])
    assert sorted(zip(polygons[0][::2], polygons[0][1::2], strict=True)) == [
        (10, 5),
        (10, 24),
        (49, 5),
        (49, 24),
    ]
    back = polygons_to_mask(polygons, 40, 60)
    assert back.dtype == bool and back.shape == (40, 60)
    assert iou(back, rectangle()) > 0.95


def test_disk_polygon_round_trip_with_and_without_simplification() -> None:
    mask = disk()
    exact = mask_to_polygons(mask)
    simplified = mask_to_polygons(mask, tolerance=1.0)
    assert len(exact) == len(simplified) == 1
    assert len(simplified[0]) < len(exact[0])
    assert iou(polygons_to_mask(exact, *mask.shape), mask) > 0.95
    assert iou(polygons_to_mask(simplified, *mask.shape), mask) > 0.95


def test_polygons_of_several_components_and_min_area() -> None:
    mask = np.zeros((50, 50), dtype=bool)
    mask[2:20, 2:20] = True  # area (of the vertex polygon) 17 * 17 = 289
    mask[30:34, 30:34] = True  # area 9
    mask[45, 45] = True  # a single pixel: fewer than 3 vertices, dropped
    assert len(mask_to_polygons(mask)) == 2
    assert len(mask_to_polygons(mask, min_area=10)) == 1
    back = polygons_to_mask(mask_to_polygons(mask), 50, 50)
    np.testing.assert_array_equal(back[:40], mask[:40])
    assert not back[45, 45]


def test_polygons_use_coco_convention() -> None:
    polygons = mask_to_polygons(disk())
    rles = mask_utils.frPyObjects(polygons, 128, 128)
    coco_mask = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    assert iou(coco_mask, disk()) > 0.95


def test_empty_mask_has_no_polygons() -> None:
    assert mask_to_polygons(np.zeros((10, 10), dtype=bool)) == []
    assert not polygons_to_mask([], 10, 10).any()


def test_overlapping_polygons_union() -> None:
    square = [0.0, 0.0, 9.0, 0.0, 9.0, 9.0, 0.0, 9.0]
    shifted = [5.0, 5.0, 14.0, 5.0, 14.0, 14.0, 5.0, 14.0]
    mask = polygons_to_mask([square, shifted], 20, 20)
    assert mask[7, 7] and mask[2, 2] and mask[12, 12]


@pytest.mark.parametrize(
    "polygon",
    [
        [0.0, 0.0, 5.0, 5.0],
        [0.0, 0.0, 5.0, 5.0, 1.0],
        [0.0, 0.0, 5.0, float("nan"), 1.0, 1.0],
        ["a", "b", "c"],
    ],
)
def test_malformed_polygons(polygon: list) -> None:
    with pytest.raises(InvalidInput) as info:
        polygons_to_mask([polygon], 10, 10)
    assert info.value.field == "polygons[0]"


def test_polygons_to_mask_bad_size() -> None:
    with pytest.raises(InvalidInput) as info:
        polygons_to_mask([], 0, 10)
    assert info.value.field == "polygons"
    with pytest.raises(ImageTooLarge):
        polygons_to_mask([], 100_000, 100_000)


# --------------------------------------------------------------------------------------------------
# area and box


def test_area_and_bbox() -> None:
    assert mask_area(rectangle()) == 20 * 40
    assert mask_bbox(rectangle()) == (10, 5, 50, 25)  # x1, y1 exclusive
    x0, y0, x1, y1 = mask_bbox(disk())  # type: ignore[misc]
    assert disk()[y0:y1, x0:x1].sum() == disk().sum()
    assert mask_bbox(np.zeros((4, 4), dtype=bool)) is None
    assert mask_area(np.zeros((4, 4), dtype=bool)) == 0


def test_bbox_matches_pycocotools() -> None:
    rle = coco_rle(disk())
    x, y, w, h = mask_utils.toBbox(rle)
    assert mask_bbox(disk()) == (int(x), int(y), int(x + w), int(y + h))


# --------------------------------------------------------------------------------------------------
# validation and batches


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((4, 4), dtype=np.float32),
        np.full((4, 4), 255, dtype=np.uint8),
        np.full((4, 4), -1, dtype=np.int32),
        np.zeros((1, 4, 4), dtype=bool),
        np.zeros((0, 4), dtype=bool),
        [[True]],
    ],
)
def test_single_mask_validation(mask: object) -> None:
    for function in (encode_rle, encode_png, mask_to_polygons, mask_area, mask_bbox):
        with pytest.raises(InvalidInput) as info:
            function(mask)  # type: ignore[operator]
        assert info.value.field == "mask"


def batch() -> np.ndarray:
    masks = np.zeros((3, 40, 60), dtype=bool)
    masks[0] = rectangle()
    masks[1, 10:30, 20:40] = True
    return masks  # masks[2] is empty


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encode_masks_dispatch(encoding: str) -> None:
    masks = batch()
    encoded = encode_masks(masks, encoding)
    assert len(encoded) == 3
    if encoding == "array":
        decoded = encoded
    elif encoding == "rle":
        decoded = [decode_rle(item) for item in encoded]
    elif encoding == "png":
        assert all(isinstance(item, bytes) for item in encoded)
        decoded = [decode_png(item) for item in encoded]
    else:
        assert encoded[2] == []
        decoded = [polygons_to_mask(item, 40, 60) for item in encoded]
    for original, result in zip(masks, decoded, strict=True):
        assert result.dtype == bool
        np.testing.assert_array_equal(result, original)


def test_encode_masks_accepts_zero_one_integers_and_empty_batch() -> None:
    assert encode_masks(batch().astype(np.uint8), "rle") == encode_masks(batch(), "rle")
    assert encode_masks(np.zeros((0, 5, 5), dtype=bool), "png") == []


def test_encode_masks_unknown_encoding() -> None:
    with pytest.raises(InvalidInput) as info:
        encode_masks(batch(), "jpeg")
    assert info.value.field == "encoding"


@pytest.mark.parametrize("masks", [rectangle(), np.zeros((2, 3, 4, 4), dtype=bool), batch().astype(float)])
def test_encode_masks_validation(masks: np.ndarray) -> None:
    with pytest.raises(InvalidInput) as info:
        encode_masks(masks, "rle")
    assert info.value.field == "masks"


def test_large_mask_is_fast() -> None:
    mask = np.zeros((2048, 2048), dtype=np.uint8)
    cv2.circle(mask, (1000, 1000), 700, 1, -1)
    mask = mask.astype(bool)
    start = time.perf_counter()
    for encoding in ENCODINGS:
        encode_masks(mask[None], encoding)
    np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)
    np.testing.assert_array_equal(decode_png(encode_png(mask)), mask)
    assert time.perf_counter() - start < 2.0  # no per-pixel Python loops anywhere
