"""Tiled embedding: tile layout, decode on containing tiles, stitching, whole-image fallback."""

from __future__ import annotations

import numpy as np
import pytest

from sam_core.errors import InvalidInput, InvalidMaskInput
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.inference.tiling import decode_tiled, encode_tiled, tile_origins, tile_starts


@pytest.mark.parametrize(("length", "tile", "overlap"), [(800, 256, 64), (257, 256, 0), (1000, 128, 32), (90, 128, 8)])
def test_tiles_cover_the_image_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert starts[-1] + tile >= length and starts[-1] + min(tile, length) == length
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= overlap  # consecutive windows overlap by at least `overlap`


def test_tile_origins_are_a_grid():
    origins = tile_origins((300, 500), 128, 32)
    assert len(origins) == len(set(origins)) == len(tile_starts(300, 128, 32)) * len(tile_starts(500, 128, 32))


def test_single_tile_image_equals_whole_image_decode(tiny_model, scene):
    image, _ = scene
    small = np.ascontiguousarray(image[:100, :120])
    predictor = Predictor(tiny_model)
    tiled = encode_tiled(predictor, small)
    assert len(tiled.tiles) == 1
    prompts = [Prompt.from_box([10, 10, 60, 50]), Prompt.from_points([[30, 40]], [1])]
    a = decode_tiled(predictor, tiled, prompts, threshold=-0.1)
    b = predictor.decode(predictor.encode_one(small), prompts, threshold=-0.1)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_allclose(a.iou_scores, b.iou_scores, atol=1e-6)


def test_prompts_use_containing_tiles_or_fall_back(tiny_model, scene):
    image, _ = scene  # 240 x 320, tile 128, overlap 32 -> 2 x 3 tiles
    predictor = Predictor(tiny_model)
    tiled = encode_tiled(predictor, image, overlap=32)
    assert len(tiled.tiles) == len(tile_origins(image.shape[:2], 128, 32))
    inside_one = Prompt.from_box([10, 10, 40, 40])           # only the top-left tile
    in_overlap = Prompt.from_box([110, 20, 120, 40])         # two horizontally overlapping tiles
    too_big = Prompt.from_box([5, 5, 315, 235])              # no tile holds it -> whole image
    result = decode_tiled(predictor, tiled, [inside_one, in_overlap, too_big], threshold=-0.05)
    assert result.masks.shape == (3, 1, *image.shape[:2])
    assert result.timings_ms["tiles_used"] == 3 and result.timings_ms["fallback_prompts"] == 1
    whole = predictor.decode(tiled.whole, [too_big], threshold=-0.05)
    np.testing.assert_array_equal(result.masks[2], whole.masks[0])
    # a tile prompt's mask never leaves the union of the tiles that hold it
    assert not result.masks[0, 0, 128:, :].any() and not result.masks[0, 0, :, 128:].any()
    assert result.low_res_logits is None


def test_tiled_rejects_mask_input_and_bad_overlap(tiny_model, scene):
    image, _ = scene
    predictor = Predictor(tiny_model)
    with pytest.raises(InvalidInput) as info:
        encode_tiled(predictor, image, overlap=128)
    assert info.value.field == "tiling.overlap"
    tiled = encode_tiled(predictor, image[:100, :100])
    with pytest.raises(InvalidMaskInput):
        decode_tiled(predictor, tiled, [Prompt(box=np.array([1, 1, 9, 9.0]), mask_input=np.zeros((1, 32, 32)))])
