"""One-shot personalisation, PerSAM-F style (Zhang et al. 2023, "Personalize Segment Anything Model with One Shot").

From one reference image and its mask, :func:`fit_persam` learns a :class:`PerSamModel`:

- ``target_feat``: the L2-normalised mean of the reference embedding's features under the mask (the
  mask is resized like the image, padded like the image, then area-pooled onto the feature grid;
  grid cells at least half covered count; a tiny object falls back to its most-covered cell);
- ``mask_weights``: weights over SAM's three multimask outputs. As in PerSAM-F only two scalars are
  trained, ``(w1, w2)``, and the stored weights are ``(1 - w1 - w2, w1, w2)`` (they sum to one;
  initialised to 1/3 each). They minimise Dice + focal loss of the weighted sum of the three logits,
  upscaled to the original image, against the reference mask (AdamW, cosine LR). The decoder runs
  once: the three logits are frozen, so training touches two scalars and takes milliseconds.

:func:`segment_persam` needs no user prompt: the cosine similarity of ``target_feat`` with every
feature of the new image is the location prior; its argmax is a positive point, its argmin a negative
one. The multimask decode is combined with ``mask_weights`` and thresholded; the optional cascaded
post-refinement decodes again with the same points, the first mask's box and the combined low-res
logits as mask input, and keeps the output with the best predicted IoU (PerSAM's refinement step 1).
Every decoder call goes through :class:`~sam_core.predictor.Predictor`, so it runs on whatever model
(and decoder adapter) the predictor holds.

Artifacts are ordinary adapter folders (:mod:`sam_core.adapter_artifact`) with method ``persam`` and
two tensors, ``persam.target_feat`` (C,) and ``persam.mask_weights`` (3,).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .adapter_artifact import (
    AdapterConfig,
    check_base,
    check_tensors,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
)
from .errors import AdapterInvalid, InvalidInput
from .losses import dice_loss, focal_loss
from .methods import MethodConfig
from .metrics import dice
from .models import LoadedModel
from .predictor import Embedding, Predictor
from .prompts import Prompt

TARGET_FEAT = "persam.target_feat"
MASK_WEIGHTS = "persam.mask_weights"
N_MULTIMASK = 3
MIN_CELL_COVERAGE = 0.5


@dataclass
class PerSamModel:
    """A personalised concept.

    target_feat: (C,) float32, unit L2 norm (C = the model's embedding channels, 256 for SAM / LiteMedSAM);
    mask_weights: (3,) float32 weights over the decoder's three multimask outputs;
    base_model_id: the :attr:`LoadedModel.model_id` whose embedding space ``target_feat`` lives in.
    """

    target_feat: torch.Tensor
    mask_weights: torch.Tensor
    base_model_id: str


# ------------------------------------------------------------------------------------------ geometry
def mask_on_grid(mask: np.ndarray, embedding: Embedding, img_size: int) -> torch.Tensor:
    """H x W bool -> h x w float32 fraction of each feature cell covered by the mask.

    The mask goes through the image's geometry: resized to ``embedding.input_size`` (area
    interpolation), zero-padded to ``img_size`` x ``img_size``, then area-pooled to the feature grid.
    """
    grid = tuple(embedding.features.shape[-2:])
    in_h, in_w = embedding.input_size
    resized = cv2.resize(mask.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_AREA)
    padded = np.zeros((img_size, img_size), np.float32)
    padded[:in_h, :in_w] = resized
    return F.adaptive_avg_pool2d(torch.from_numpy(padded)[None, None], grid)[0, 0]


def target_feature(features: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """1 x C x h x w features, h x w coverage -> (C,) unit-norm mean feature of the covered cells.

    Cells covered at least :data:`MIN_CELL_COVERAGE` count; if none is (a tiny object), the single
    most-covered cell is used.
    """
    feats = features[0].float().flatten(1)  # C x hw
    cover = coverage.flatten()
    if float(cover.max()) <= 0.0:
        raise InvalidInput("the reference mask does not cover any part of the image", field="ref_mask")
    selected = cover >= MIN_CELL_COVERAGE
    if not bool(selected.any()):
        selected = torch.zeros_like(selected)
        selected[int(torch.argmax(cover))] = True
    return F.normalize(feats[:, selected].mean(dim=1), dim=0)


def similarity_map(predictor: Predictor, embedding: Embedding, target_feat: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``target_feat`` (C,) with every feature -> H x W in the original frame.

    The h x w map is upsampled to the low-res mask size (like PerSAM's 4x) and then post-processed
    exactly like mask logits (:meth:`Predictor.upscale`: to the padded input, crop, to the original size).
    """
    feats = F.normalize(embedding.features[0].float().to(target_feat.device), dim=0)  # C x h x w
    if feats.shape[0] != target_feat.shape[0]:
        raise InvalidInput(f"target_feat has {target_feat.shape[0]} channels, the embedding {feats.shape[0]}",
                           field="persam")
    sim = torch.einsum("c,chw->hw", target_feat.float(), feats)
    low = predictor.spec.low_res_size
    sim = F.interpolate(sim[None, None], (low, low), mode="bilinear", align_corners=False)
    return predictor.upscale(sim, embedding)[0, 0]


def location_prior(sim: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """H x W similarity -> ((x, y) of the argmax = positive point, (x, y) of the argmin = negative point)."""
    w = sim.shape[1]
    hi, lo = int(torch.argmax(sim)), int(torch.argmin(sim))
    return (hi % w, hi // w), (lo % w, lo // w)


def _prior_prompt(positive: tuple[int, int], negative: tuple[int, int]) -> Prompt:
    return Prompt.from_points([positive, negative], [1, 0])


def _box_of(mask: np.ndarray) -> np.ndarray:
    """H x W bool (non-empty) -> (4,) x0, y0, x1, y1 pixel indices of its bounding box."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def _full_weights(free: torch.Tensor) -> torch.Tensor:
    """PerSAM-F's parametrisation: (w1, w2) -> (1 - w1 - w2, w1, w2)."""
    return torch.cat([1.0 - free.sum(dim=0, keepdim=True), free])


def _check_image(image: np.ndarray, field: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise InvalidInput(f"must be an H x W x 3 uint8 array, got {shape}", field=field)


# ------------------------------------------------------------------------------------------ fit
def fit_persam(predictor: Predictor, ref_image: np.ndarray, ref_mask: np.ndarray, *, steps: int = 200,
               lr: float = 1e-3, seed: int = 0,
               callback: Callable[[int, float], None] | None = None) -> tuple[PerSamModel, dict[str, Any]]:
    """Learn a :class:`PerSamModel` from one reference image (H x W x 3 uint8) and its mask (H x W bool).

    ``callback(step, loss)`` is called after every optimiser step. Returns the model and
    ``{"losses": [float] * steps, "seconds", "ref_dice" (final weights, thresholded at 0),
    "initial_ref_dice" (equal weights), "point", "negative_point", "similarity_max"}``.
    """
    t0 = time.perf_counter()
    _check_image(ref_image, "ref_image")
    mask = np.asarray(ref_mask).astype(bool)
    if mask.shape != ref_image.shape[:2]:
        raise InvalidInput(f"shape {mask.shape} must equal the image's {ref_image.shape[:2]}", field="ref_mask")
    if not mask.any():
        raise InvalidInput("the reference mask is empty", field="ref_mask")
    if steps < 0:
        raise InvalidInput(f"must be >= 0, got {steps}", field="steps")

    embedding = predictor.encode_one(ref_image)
    target_feat = target_feature(embedding.features, mask_on_grid(mask, embedding, predictor.spec.img_size))
    sim = similarity_map(predictor, embedding, target_feat)
    positive, negative = location_prior(sim)
    decoded = predictor.decode(embedding, [_prior_prompt(positive, negative)], multimask=True)
    assert decoded.low_res_logits is not None
    with torch.no_grad():  # the three full-size logits are frozen: 3 x H x W
        logits = predictor.upscale(torch.from_numpy(decoded.low_res_logits), embedding)[0].float().cpu()
    target = torch.from_numpy(mask).float()[None, None]

    losses: list[float] = []
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)  # nothing is random today; keeps future changes reproducible
        free = torch.nn.Parameter(torch.full((N_MULTIMASK - 1,), 1.0 / N_MULTIMASK))
        optimizer = torch.optim.AdamW([free], lr=lr, eps=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
        for step in range(steps):
            combined = torch.einsum("m,mhw->hw", _full_weights(free), logits)[None, None]
            loss = dice_loss(combined, target) + focal_loss(combined, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
    weights = _full_weights(free.detach()).clone()

    def ref_dice(w: torch.Tensor) -> float:
        return dice((torch.einsum("m,mhw->hw", w, logits) > 0).numpy(), mask)

    persam = PerSamModel(target_feat=target_feat.detach().cpu().clone(), mask_weights=weights,
                         base_model_id=predictor.model_id)
    info = {
        "losses": losses,
        "seconds": time.perf_counter() - t0,
        "ref_dice": ref_dice(weights),
        "initial_ref_dice": ref_dice(torch.full((N_MULTIMASK,), 1.0 / N_MULTIMASK)),
        "point": positive,
        "negative_point": negative,
        "similarity_max": float(sim.max()),
    }
    return persam, info


# ------------------------------------------------------------------------------------------ segment
def segment_persam(predictor: Predictor, persam: PerSamModel, image: np.ndarray | None, *, cascade: bool = True,
                   embedding: Embedding | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Segment the personalised concept in ``image`` (H x W x 3 uint8) without user prompts.

    Pass ``embedding`` to skip the encoder (``image`` may then be None). Returns the H x W bool mask
    and ``{"score" (predicted IoU: of the refined mask, or the mask_weights-weighted IoUs without
    cascade), "point" (x, y), "negative_point" (x, y), "similarity_max", "cascaded"}``.
    """
    if persam.base_model_id != predictor.model_id:
        raise AdapterInvalid(f"persam model was fitted on {persam.base_model_id}, the predictor runs "
                             f"{predictor.model_id}", field="persam")
    if embedding is None:
        if image is None:
            raise InvalidInput("an image or an embedding is required", field="image")
        _check_image(image, "image")
        embedding = predictor.encode_one(image)
    else:
        predictor.check_embedding(embedding)
        if image is not None and tuple(image.shape[:2]) != tuple(embedding.original_size):
            raise InvalidInput(f"image is {image.shape[:2]} but the embedding is of {embedding.original_size}",
                               field="image")

    weights = persam.mask_weights.detach().float().cpu().numpy()
    sim = similarity_map(predictor, embedding, persam.target_feat.detach().float().cpu())
    positive, negative = location_prior(sim)
    prompt = _prior_prompt(positive, negative)
    first = predictor.decode(embedding, [prompt], multimask=True)
    assert first.low_res_logits is not None
    combined_low = np.tensordot(weights, first.low_res_logits[0], axes=1).astype(np.float32)  # L x L
    with torch.no_grad():
        logits = predictor.upscale(torch.from_numpy(combined_low)[None, None], embedding)[0, 0]
    mask = (logits > 0).cpu().numpy()
    score = float(weights @ first.iou_scores[0])
    cascaded = False
    if cascade and mask.any():
        refine = Prompt(box=_box_of(mask), point_coords=prompt.point_coords, point_labels=prompt.point_labels,
                        mask_input=combined_low[None])
        second = predictor.decode(embedding, [refine], multimask=True, return_low_res=False)
        best = int(np.argmax(second.iou_scores[0]))
        mask, score, cascaded = second.masks[0, best], float(second.iou_scores[0, best]), True
    info = {"score": score, "point": positive, "negative_point": negative,
            "similarity_max": float(sim.max()), "cascaded": cascaded}
    return np.ascontiguousarray(mask, dtype=bool), info


# ------------------------------------------------------------------------------------------ artifacts
def _embed_dim(model: LoadedModel) -> int:
    return int(model.sam.prompt_encoder.embed_dim)


def save_persam(out_dir: str | os.PathLike, model: LoadedModel, persam: PerSamModel, *,
                metrics: dict[str, Any] | None = None, name: str | None = None) -> AdapterConfig:
    """Write ``persam`` as an adapter artifact (method ``persam``) for ``model``; returns its config."""
    if persam.base_model_id != model.model_id:
        raise InvalidInput(f"persam model was fitted on {persam.base_model_id}, not on {model.model_id}",
                           field="persam")
    tensors = {TARGET_FEAT: persam.target_feat.detach().float().cpu(),
               MASK_WEIGHTS: persam.mask_weights.detach().float().cpu()}
    expected = {TARGET_FEAT: (_embed_dim(model),), MASK_WEIGHTS: (N_MULTIMASK,)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise InvalidInput(f"{key} must have shape {shape}, got {tuple(tensors[key].shape)}", field="persam")
    return save_adapter(out_dir, model, tensors, MethodConfig("persam"), metrics=metrics, name=name)


def load_persam(model: LoadedModel, path: str | os.PathLike) -> PerSamModel:
    """Read a ``persam`` artifact fitted on ``model``.

    Raises AdapterInvalid for another method's artifact, another base model, a checksum mismatch,
    missing / unexpected / mis-shaped tensors or non-finite values (NotFound without a config).
    """
    source = str(path)
    config = read_adapter_config(path)
    if config.method != "persam":
        raise AdapterInvalid(f"{source} is a {config.method} artifact, not persam; load it with "
                             "sam_core.adapter_artifact.load_adapter", field="adapter")
    check_base(config, model, source)
    tensors = read_adapter_tensors(path, config)
    expected = {TARGET_FEAT: torch.Size([_embed_dim(model)]), MASK_WEIGHTS: torch.Size([N_MULTIMASK])}
    check_tensors(expected, tensors, source)
    bad = sorted(k for k, v in tensors.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise AdapterInvalid(f"{source}: non-finite values in {', '.join(bad)}", field="adapter")
    return PerSamModel(target_feat=tensors[TARGET_FEAT].float(), mask_weights=tensors[MASK_WEIGHTS].float(),
                       base_model_id=config.base_model_id)
