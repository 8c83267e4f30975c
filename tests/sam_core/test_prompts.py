"""Prompt validation: every bad input is a typed error naming its field; the predictor rejects them."""

from __future__ import annotations

import numpy as np
import pytest

from sam_core.errors import InvalidInput, InvalidMaskInput, InvalidPrompt, TooManyPrompts
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt, validate_prompts

SIZE = (100, 200)  # H, W
LOW = 32


def _err(prompts, max_prompts=8):
    with pytest.raises(InvalidInput) as info:
        validate_prompts(prompts, SIZE, LOW, max_prompts)
    return info.value


@pytest.mark.parametrize(
    ("prompt", "kind", "field"),
    [
        (Prompt.from_box([0, 0, np.nan, 10]), InvalidPrompt, "prompts[1].box"),
        (Prompt.from_box([0, 0, np.inf, 10]), InvalidPrompt, "prompts[1].box"),
        (Prompt.from_box([0, 0, 250, 10]), InvalidPrompt, "prompts[1].box"),
        (Prompt.from_box([-1, 0, 20, 10]), InvalidPrompt, "prompts[1].box"),
        (Prompt.from_box([30, 0, 20, 10]), InvalidPrompt, "prompts[1].box"),
        (Prompt(box=np.array([1.0, 2.0, 3.0])), InvalidPrompt, "prompts[1].box"),
        (Prompt.from_points([[10, np.nan]], [1]), InvalidPrompt, "prompts[1].point_coords"),
        (Prompt.from_points([[10, 101]], [1]), InvalidPrompt, "prompts[1].point_coords"),
        (Prompt.from_points([[10, 10]], [2]), InvalidPrompt, "prompts[1].point_labels"),
        (Prompt.from_points([[10, 10], [20, 20]], [1]), InvalidPrompt, "prompts[1].point_labels"),
        (Prompt(point_coords=np.array([[1.0, 2.0]])), InvalidPrompt, "prompts[1].point_labels"),
        (Prompt(point_coords=np.array([1.0, 2.0]), point_labels=np.array([1])), InvalidPrompt,
         "prompts[1].point_coords"),
        (Prompt(), InvalidPrompt, "prompts[1]"),
        (Prompt(box=np.array([0, 0, 10, 10.0]), mask_input=np.zeros((1, 64, 64))), InvalidMaskInput,
         "prompts[1].mask_input"),
        (Prompt(box=np.array([0, 0, 10, 10.0]), mask_input=np.full((1, LOW, LOW), np.nan)), InvalidMaskInput,
         "prompts[1].mask_input"),
    ],
)
def test_bad_prompt_names_its_field(prompt, kind, field):
    err = _err([Prompt.from_box([0, 0, 10, 10]), prompt])
    assert isinstance(err, kind)
    assert err.field == field and str(err).startswith(field)


def test_empty_prompt_list():
    err = _err([])
    assert isinstance(err, InvalidPrompt) and err.field == "prompts"


def test_too_many_prompts():
    err = _err([Prompt.from_box([0, 0, 10, 10])] * 9, max_prompts=8)
    assert isinstance(err, TooManyPrompts) and err.field == "prompts" and "8" in str(err)


def test_valid_prompts_come_back_clean():
    out = validate_prompts([Prompt.from_points([[0, 0], [200, 100]], [1, 0]),
                            Prompt(box=np.array([1, 2, 3, 4]), mask_input=np.zeros((LOW, LOW)))], SIZE, LOW)
    assert out[0].point_labels.dtype == np.int64
    assert out[1].mask_input.shape == (1, LOW, LOW)


def test_predictor_rejects_bad_prompts_and_keeps_working(tiny_model, scene):
    image, _ = scene
    predictor = Predictor(tiny_model, max_prompts=4)
    embedding = predictor.encode_one(image)
    with pytest.raises(TooManyPrompts):
        predictor.decode(embedding, [Prompt.from_box([0, 0, 5, 5])] * 5)
    with pytest.raises(InvalidPrompt):
        predictor.decode(embedding, [Prompt.from_points([[np.nan, 1]], [1])])
    assert predictor.decode(embedding, [Prompt.from_box([0, 0, 5, 5])]).masks.shape == (1, 1, *image.shape[:2])


def test_predictor_refuses_foreign_embedding(tiny_model, scene):
    from sam_core.modeling.registry import build_tiny

    image, _ = scene
    other = Predictor(build_tiny(seed=3))
    embedding = other.encode_one(image)
    with pytest.raises(InvalidInput) as info:
        Predictor(tiny_model).decode(embedding, [Prompt.from_box([0, 0, 5, 5])])
    assert info.value.field == "embedding"
