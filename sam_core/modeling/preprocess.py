"""Per-model preprocessing: resize (longest side or square), normalise, pad; coordinate and mask transforms.

All functions take the canonical image from :mod:`sam_core.io.images` (H x W x 3 uint8 RGB).
:func:`preprocess` is :func:`resize_image` (the only step whose cost and memory depend on the input size) then
:func:`model_input` (normalise and pad the at most S x S x 3 resized image); callers may run the two apart.

- SAM (``imagenet``): ``ResizeLongestSide.apply_image`` (PIL bilinear, exactly what
  ``SamPredictor.set_image`` does), then (x - mean) / std, then zero padding to ``img_size``.
- LiteMedSAM (``minmax``): ``cv2.resize(INTER_AREA)`` as the LiteMedSAM reference inference does,
  per-image (x - min) / max(max - min, 1e-8) to [0, 1], then zero padding.

- SAM 2 (``resize="square"``): ``SAM2Transforms`` exactly: pixels to 0..1 (``ToTensor``), antialiased
  bilinear resize to ``img_size x img_size`` ignoring the aspect ratio (torchvision ``Resize`` on the float
  tensor; the resized image stays float32 0..1, no uint8 rounding), (x - mean) / std in 0..1 units, no padding.
  Low-res logits go straight to the original size (``SAM2Transforms.postprocess_masks``).

Coordinates are scaled per axis by the same resized shape, as ``ResizeLongestSide.apply_coords`` does (and, for
a square resize, ``SAM2Transforms.transform_coords``). The coordinate and logit functions take the model's
``ModelSpec`` or, for SAM 1 callers, its bare ``img_size`` (a longest-side resize).
Every side of the resized image is at least one pixel: an image with an extreme aspect ratio (1 x 5000) would
otherwise round a side to zero (segment_anything's shape rule), which no resize accepts.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.transforms.functional import resize, to_pil_image

from sam_core.modeling.family import ModelSpec

SizeOrSpec = int | ModelSpec
"""A model's ``ModelSpec``, or its ``img_size`` alone meaning a longest-side resize (SAM 1)."""


def _is_square(size: SizeOrSpec) -> bool:
    return isinstance(size, ModelSpec) and size.resize == "square"


def _side(size: SizeOrSpec) -> int:
    return size.img_size if isinstance(size, ModelSpec) else size


def resized_shape(original_size: tuple[int, int], img_size: int) -> tuple[int, int]:
    """(H, W) after scaling the longest side to ``img_size`` (rounded like segment_anything), each side >= 1."""
    h, w = ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], img_size)
    return max(1, int(h)), max(1, int(w))


def input_shape(original_size: tuple[int, int], size: SizeOrSpec) -> tuple[int, int]:
    """(h, w) of the resized image before padding: S x S for a square resize, else :func:`resized_shape`."""
    if _is_square(size):
        return _side(size), _side(size)
    return resized_shape(original_size, _side(size))


def resize_image(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """H x W x 3 uint8 -> h x w x 3 uint8 with max(h, w) == spec.img_size (and min(h, w) >= 1); for a square
    resize S x S x 3 float32 in 0..1 (``SAM2Transforms``: ToTensor, then Resize((S, S)) antialiased)."""
    if _is_square(spec):
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous().float().div(255)
        square: np.ndarray = resize(pixels, [spec.img_size, spec.img_size], antialias=True).permute(1, 2, 0).numpy()
        return square
    h, w = resized_shape(image.shape[:2], spec.img_size)
    if spec.normalization == "minmax":
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    # ResizeLongestSide.apply_image's own operation (torchvision's PIL resize), at the clamped shape
    resized: np.ndarray = np.array(resize(to_pil_image(image), [h, w]))
    return resized


def normalize_and_pad(resized: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """B x 3 x h x w float (0..255; 0..1 for a square resize) -> B x 3 x S x S normalised and zero-padded."""
    x = resized.float()
    if spec.normalization == "minmax":
        flat = x.flatten(1)
        lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
        hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
        x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
    else:
        mean = torch.tensor(spec.pixel_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.pixel_std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, spec.img_size - w, 0, spec.img_size - h))


def model_input(resized: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """h x w x 3 from :func:`resize_image` -> 1 x 3 x S x S model input (normalised, zero-padded)."""
    tensor = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)[None]
    return normalize_and_pad(tensor, spec)


def preprocess(image: np.ndarray, spec: ModelSpec) -> tuple[torch.Tensor, tuple[int, int]]:
    """H x W x 3 uint8 -> (1 x 3 x S x S model input, input_size (h, w) before padding)."""
    resized = resize_image(image, spec)
    return model_input(resized, spec), (resized.shape[0], resized.shape[1])


def transform_coords(coords: np.ndarray, original_size: tuple[int, int], img_size: SizeOrSpec) -> np.ndarray:
    """... x 2 (x, y) in original pixels -> model input frame (float32)."""
    new_h, new_w = input_shape(original_size, img_size)
    scaled = np.array(coords, dtype=np.float64)
    scaled[..., 0] *= new_w / original_size[1]
    scaled[..., 1] *= new_h / original_size[0]
    return scaled.astype(np.float32)


def transform_boxes(boxes: np.ndarray, original_size: tuple[int, int], img_size: SizeOrSpec) -> np.ndarray:
    """N x 4 (x0, y0, x1, y1) original pixels -> model input frame (float32)."""
    return transform_coords(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2), original_size, img_size).reshape(
        -1, 4
    )


def upscale_logits(low_res: torch.Tensor, img_size: SizeOrSpec, input_size: tuple[int, int],
                   original_size: tuple[int, int]) -> torch.Tensor:
    """B x M x l x l low-res logits -> B x M x H x W logits in the original frame.

    Same operations as ``Sam.postprocess_masks``: bilinear to the padded input, crop the padding,
    bilinear to the original size. A bilinear resize to the same size (align_corners=False: every
    sample lands on a source pixel with weight exactly 1) is the identity, so it is skipped; that is
    the first resize for LiteMedSAM (l = img_size = 256) and the second for images already at input size
    (the result may then be a view of ``low_res``: treat it as read-only). A square resize (SAM 2) goes from
    the low-res logits straight to the original size, as ``SAM2Transforms.postprocess_masks`` does.
    """
    masks = low_res
    side = _side(img_size)
    if _is_square(img_size):
        if tuple(masks.shape[-2:]) == tuple(original_size):
            return masks
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
    if tuple(masks.shape[-2:]) != (side, side):
        masks = F.interpolate(masks, (side, side), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    if tuple(masks.shape[-2:]) == tuple(original_size):
        return masks
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
