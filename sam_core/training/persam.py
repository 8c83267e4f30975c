"""One-shot personalisation, PerSAM-F style (Zhang et al. 2023, "Personalize Segment Anything Model with One Shot").

From one reference image and its mask, :func:`fit_persam` learns a :class:`PerSamModel`:

- ``target_feat``: the L2-normalised mean of the reference's *centred* features under the mask (the
  mask is resized like the image, padded like the image, then area-pooled onto the feature grid;
  grid cells at least half covered count; a tiny object falls back to its most-covered cell);
- ``mask_weights``: weights over SAM's three multimask outputs of the point prompts. As in PerSAM-F
  only two scalars are trained, ``(w1, w2)``, and the stored weights are ``(1 - w1 - w2, w1, w2)``
  (they sum to one; initialised to 1/3 each). They minimise Dice + focal loss of the weighted sum of
  the three logits, upscaled to the original image, against the reference mask (AdamW, cosine LR).
  The decoder runs once: the three logits are frozen, so training touches two scalars;
- ``prompt_mode``: how the location prior prompts the decoder (below), chosen on the reference.

:func:`segment_persam` needs no user prompt: the cosine similarity of ``target_feat`` with every
centred feature of the new image is the location prior. Two prompt modes turn it into a mask:

- ``"points"`` (PerSAM-F): the similarity argmax is a positive point, its argmin a negative one; the
  multimask decode is combined with ``mask_weights`` and thresholded;
- ``"box"`` (not in the paper): the similarity map is thresholded at ``median + 0.5 * (max - median)``,
  the connected region containing the argmax is kept, and its bounding box, widened by 30 % (15 % of
  its size on each side), is a box prompt decoded as one mask (SAM's single-output mode, the one to
  use for an unambiguous prompt such as a box). ``mask_weights`` are not used.

  Why: box-prompt-only models such as LiteMedSAM (the default model) return near-flat logits for
  point prompts, so PerSAM's first stage finds almost nothing, while the box from the similarity map
  segments the object. Measured with LiteMedSAM on 40 random synthetic one-ellipse pairs (fit on A,
  segment B, with the cascade): points mean Dice 0.13 (median 0.08), box 0.94 (median 0.99); the
  box's multimask outputs combined with fitted weights did no better (0.94) than the single decode.

The optional cascaded post-refinement (PerSAM's refinement step 1) decodes again with the first
mask's box and the first stage's low-res logits as mask input (plus the two points in points mode)
and keeps the output with the best predicted IoU. :func:`fit_persam` with ``prompt_mode="auto"``
keeps the mode whose :func:`segment_persam` result on the reference image itself has the higher
Dice. Every decoder call goes through :class:`~sam_core.inference.predictor.Predictor`, so it runs on whatever
model (and decoder adapter) the predictor holds.

Deviation from the paper — feature centring: before every cosine similarity (the target feature and
the similarity map, when fitting and when segmenting) each image's mean feature vector, over the
feature cells that cover the image (not the padding), is subtracted from its features. Raw SAM /
LiteMedSAM features share a large common component, so raw cosine similarities are all high and the
argmax often lands on background; centring raised the prior's hit rate (argmax inside the new image's
object) on synthetic ellipse pairs with LiteMedSAM from 107 / 132 to 124 / 132, and from 35 / 40 to
39 / 40 on another 40 pairs.

A concept is tied to the embedding space it was fitted in: the base model id and the encoder
adapter id (None for the base model and decoder-only adapters) are recorded, and
:func:`segment_persam` refuses a predictor whose model or encoder adapter differs.

Artifacts are ordinary adapter folders (:mod:`sam_core.adapters.artifact`) with method ``persam`` and
three tensors, ``persam.target_feat`` (C,) float32, ``persam.mask_weights`` (3,) float32 and
``persam.prompt_mode`` (1,) int64 (0 = points, 1 = box); the encoder adapter id is stored in the
config's metrics under :data:`ENCODER_ADAPTER_METRIC`. Artifacts without the prompt-mode tensor
(written before it existed) are refused.
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

from sam_core.adapters.artifact import (
    AdapterConfig,
    check_base,
    check_tensors,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
)
from sam_core.errors import AdapterInvalid, InvalidInput
from sam_core.evaluation.metrics import dice
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.inference.types import Embedding
from sam_core.modeling.registry import LoadedModel
from sam_core.training.losses import dice_loss, focal_loss
from sam_core.training.methods import MethodConfig
from sam_core.training.methods.persam import PersamMethod

TARGET_FEAT = "persam.target_feat"
MASK_WEIGHTS = "persam.mask_weights"
PROMPT_MODE = "persam.prompt_mode"
ENCODER_ADAPTER_METRIC = "persam_encoder_adapter_id"
PROMPT_MODES = ("points", "box")  # index = the value stored in the PROMPT_MODE tensor
N_MULTIMASK = 3
MIN_CELL_COVERAGE = 0.5
BOX_THRESHOLD = 0.5  # box prior: keep similarities >= median + BOX_THRESHOLD * (max - median)
BOX_MARGIN = 0.15  # box prior: widen the region's box by this fraction of its size on each side


@dataclass
class PerSamModel:
    """A personalised concept.

    target_feat: (C,) float32, unit L2 norm (C = the model's embedding channels, 256 for SAM / LiteMedSAM),
    in the centred feature space;
    mask_weights: (3,) float32 weights over the decoder's three multimask outputs (points mode);
    base_model_id: the :attr:`LoadedModel.model_id` whose embedding space ``target_feat`` lives in;
    prompt_mode: ``"points"`` or ``"box"`` (see the module docstring);
    encoder_adapter_id: the :attr:`LoadedModel.encoder_adapter_id` it was fitted with (None: the base
    encoder, also for decoder-only adapters).
    """

    target_feat: torch.Tensor
    mask_weights: torch.Tensor
    base_model_id: str
    prompt_mode: str = "points"
    encoder_adapter_id: str | None = None


# ------------------------------------------------------------------------------------------ geometry
def mask_on_grid(mask: np.ndarray, embedding: Embedding, img_size: int) -> torch.Tensor:
    """H x W bool -> h x w float32 fraction of each feature cell covered by the mask.

    The mask goes through the image's geometry: resized to ``embedding.input_size`` (area
    interpolation), zero-padded to ``img_size`` x ``img_size``, then area-pooled to the feature grid.
    """
    grid = (embedding.image_embedding.shape[-2], embedding.image_embedding.shape[-1])
    in_h, in_w = embedding.input_size
    resized = cv2.resize(mask.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_AREA)
    padded = np.zeros((img_size, img_size), np.float32)
    padded[:in_h, :in_w] = resized
    return F.adaptive_avg_pool2d(torch.from_numpy(padded)[None, None], grid)[0, 0]


def centred_features(embedding: Embedding, img_size: int) -> torch.Tensor:
    """1 x C x h x w features minus their mean over the cells that cover the image (not only padding).

    A deviation from PerSAM (see the module docstring): it removes the component all features share,
    which otherwise dominates every cosine similarity.
    """
    feats = embedding.image_embedding.float()
    grid_h, grid_w = feats.shape[-2:]
    in_h, in_w = embedding.input_size
    rows = max(1, min(grid_h, -(-in_h * grid_h // img_size)))  # ceil: cells touching the image
    cols = max(1, min(grid_w, -(-in_w * grid_w // img_size)))
    return feats - feats[:, :, :rows, :cols].mean(dim=(2, 3), keepdim=True)


def target_feature(features: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """1 x C x h x w features, h x w coverage -> (C,) unit-norm mean feature of the covered cells.

    Cells covered at least :data:`MIN_CELL_COVERAGE` count; if none is (a tiny object), the single
    most-covered cell is used. :func:`fit_persam` passes :func:`centred_features`.
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
    """Cosine similarity of ``target_feat`` (C,) with every centred feature -> H x W in the original frame.

    The features are centred with :func:`centred_features` (a deviation from PerSAM). The h x w map is
    upsampled to the low-res mask size (like PerSAM's 4x) and then post-processed exactly like mask
    logits (:meth:`Predictor.upscale`: to the padded input, crop, to the original size).
    """
    feats = centred_features(embedding, predictor.spec.img_size)[0].to(target_feat.device)
    if feats.shape[0] != target_feat.shape[0]:
        raise InvalidInput(f"target_feat has {target_feat.shape[0]} channels, the embedding {feats.shape[0]}",
                           field="persam")
    sim = torch.einsum("c,chw->hw", target_feat.float(), F.normalize(feats, dim=0))
    low = predictor.spec.low_res_size
    sim = F.interpolate(sim[None, None], (low, low), mode="bilinear", align_corners=False)
    return predictor.upscale(sim, embedding)[0, 0]


def location_prior(sim: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """H x W similarity -> ((x, y) of the argmax = positive point, (x, y) of the argmin = negative point)."""
    w = sim.shape[1]
    hi, lo = int(torch.argmax(sim)), int(torch.argmin(sim))
    return (hi % w, hi // w), (lo % w, lo // w)


def box_prior(sim: torch.Tensor, *, threshold: float = BOX_THRESHOLD, margin: float = BOX_MARGIN) -> np.ndarray:
    """H x W similarity -> (4,) x0, y0, x1, y1 box prompt around the most similar region.

    Keeps the pixels >= ``median + threshold * (max - median)``, takes the 8-connected region that
    contains the argmax, and widens its bounding box by ``margin`` of its width / height on each side
    (clipped to the image).
    """
    values = sim.detach().float().cpu().numpy()
    height, width = values.shape
    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    median, top = float(np.median(values)), float(values[peak])
    region = (values >= median + threshold * (top - median)).astype(np.uint8)
    region[peak] = 1  # the argmax belongs to its region even if rounding says otherwise
    _, labels = cv2.connectedComponents(region, connectivity=8)
    x0, y0, x1, y1 = _box_of(labels == labels[peak])
    dx, dy = margin * (x1 - x0 + 1), margin * (y1 - y0 + 1)
    return np.array([max(0.0, x0 - dx), max(0.0, y0 - dy), min(width - 1.0, x1 + dx), min(height - 1.0, y1 + dy)])


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


def _embedding_for(predictor: Predictor, image: np.ndarray | None, embedding: Embedding | None,
                   field: str) -> Embedding:
    """The image's embedding: ``embedding`` after checking it belongs to this predictor (and to ``image``),
    else the encoded ``image``."""
    if embedding is None:
        if image is None:
            raise InvalidInput("an image or an embedding is required", field=field)
        _check_image(image, field)
        return predictor.encode_one(image)
    predictor.check_embedding(embedding)
    if image is not None and tuple(image.shape[:2]) != tuple(embedding.original_size):
        raise InvalidInput(f"image is {image.shape[:2]} but the embedding is of {embedding.original_size}",
                           field=field)
    return embedding


def _check_mode(prompt_mode: str, allowed: tuple[str, ...]) -> None:
    if prompt_mode not in allowed:
        raise InvalidInput(f"must be one of {', '.join(allowed)}, got {prompt_mode!r}", field="prompt_mode")


# ------------------------------------------------------------------------------------------ fit
def fit_mask_weights(logits: torch.Tensor, mask: np.ndarray, *, steps: int, lr: float, seed: int,
                     callback: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, list[float]]:
    """PerSAM-F's training: the two free weights (w1, w2) of the three frozen multimask logits (3 x H x W)
    minimising Dice + focal loss against ``mask`` (H x W bool). AdamW with cosine LR from equal weights.
    Returns the (3,) weights (1 - w1 - w2, w1, w2) and the loss of every step."""
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
            torch.autograd.backward(loss)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
    return _full_weights(free.detach()).clone(), losses


def fit_persam(predictor: Predictor, ref_image: np.ndarray | None, ref_mask: np.ndarray, *, steps: int = 200,
               lr: float = 1e-3, seed: int = 0, prompt_mode: str = "auto", cascade: bool = True,
               embedding: Embedding | None = None,
               callback: Callable[[int, float], None] | None = None) -> tuple[PerSamModel, dict[str, Any]]:
    """Learn a :class:`PerSamModel` from one reference image (H x W x 3 uint8) and its mask (H x W bool).

    Pass ``embedding`` to skip the encoder (``ref_image`` may then be None). The mask weights are always
    fitted (on the points-mode decode). ``prompt_mode`` is ``"points"``, ``"box"`` or ``"auto"``: the
    mode whose :func:`segment_persam` result (with ``cascade``) on the reference itself has the higher
    Dice against ``ref_mask`` (points on a tie). ``callback(step, loss)`` is called after every
    optimiser step. Returns the model and ``{"losses": [float] * steps, "seconds", "prompt_mode",
    "ref_dice" (the chosen mode's reference Dice), "ref_dice_points", "ref_dice_box", "fit_dice" /
    "initial_fit_dice" (first-stage points-mode reference Dice with the fitted / equal weights, the
    fitting objective), "point", "negative_point", "box" (the reference's box prior), "similarity_max"}``.
    """
    t0 = time.perf_counter()
    _check_mode(prompt_mode, ("auto", *PROMPT_MODES))
    embedding = _embedding_for(predictor, ref_image, embedding, "ref_image")
    mask = np.asarray(ref_mask).astype(bool)
    if mask.shape != tuple(embedding.original_size):
        raise InvalidInput(f"shape {mask.shape} must equal the image's {tuple(embedding.original_size)}",
                           field="ref_mask")
    if not mask.any():
        raise InvalidInput("the reference mask is empty", field="ref_mask")
    if steps < 0:
        raise InvalidInput(f"must be >= 0, got {steps}", field="steps")

    coverage = mask_on_grid(mask, embedding, predictor.spec.img_size)
    target_feat = target_feature(centred_features(embedding, predictor.spec.img_size), coverage)
    sim = similarity_map(predictor, embedding, target_feat)
    positive, negative = location_prior(sim)
    decoded = predictor.decode(embedding, [_prior_prompt(positive, negative)], multimask=True)
    assert decoded.low_res_logits is not None
    with torch.no_grad():  # the three full-size logits are frozen: 3 x H x W
        logits = predictor.upscale(torch.from_numpy(decoded.low_res_logits), embedding)[0].float().cpu()
    weights, losses = fit_mask_weights(logits, mask, steps=steps, lr=lr, seed=seed, callback=callback)

    def fit_dice(w: torch.Tensor) -> float:
        return dice((torch.einsum("m,mhw->hw", w, logits) > 0).numpy(), mask)

    candidates = {mode: PerSamModel(target_feat=target_feat.detach().cpu().clone(), mask_weights=weights,
                                    base_model_id=predictor.model_id, prompt_mode=mode,
                                    encoder_adapter_id=predictor.model.encoder_adapter_id)
                  for mode in PROMPT_MODES}
    ref_dice = {mode: dice(segment_persam(predictor, candidate, None, cascade=cascade, embedding=embedding)[0], mask)
                for mode, candidate in candidates.items()}
    if prompt_mode == "auto":
        prompt_mode = "box" if ref_dice["box"] > ref_dice["points"] else "points"
    info = {
        "losses": losses,
        "seconds": time.perf_counter() - t0,
        "prompt_mode": prompt_mode,
        "ref_dice": ref_dice[prompt_mode],
        "ref_dice_points": ref_dice["points"],
        "ref_dice_box": ref_dice["box"],
        "fit_dice": fit_dice(weights),
        "initial_fit_dice": fit_dice(torch.full((N_MULTIMASK,), 1.0 / N_MULTIMASK)),
        "point": positive,
        "negative_point": negative,
        "box": box_prior(sim).tolist(),
        "similarity_max": float(sim.max()),
    }
    return candidates[prompt_mode], info


# ------------------------------------------------------------------------------------------ segment
def segment_persam(predictor: Predictor, persam: PerSamModel, image: np.ndarray | None, *, cascade: bool = True,
                   embedding: Embedding | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Segment the personalised concept in ``image`` (H x W x 3 uint8) without user prompts.

    Pass ``embedding`` to skip the encoder (``image`` may then be None). Raises AdapterInvalid when the
    predictor's base model or encoder adapter is not the one ``persam`` was fitted with. Returns the
    H x W bool mask and ``{"score" (predicted IoU: of the refined mask, else of the box decode, or the
    mask_weights-weighted IoUs in points mode), "prompt_mode", "point" (x, y), "negative_point" (x, y),
    "box" (the box prompt, box mode; else None), "similarity_max", "cascaded"}``.
    """
    if persam.base_model_id != predictor.model_id:
        raise AdapterInvalid(f"persam model was fitted on {persam.base_model_id}, the predictor runs "
                             f"{predictor.model_id}", field="persam")
    encoder_adapter = predictor.model.encoder_adapter_id
    if persam.encoder_adapter_id != encoder_adapter:
        raise AdapterInvalid(f"persam model was fitted with image-encoder adapter {persam.encoder_adapter_id}, "
                             f"the predictor runs {encoder_adapter}", field="persam")
    _check_mode(persam.prompt_mode, PROMPT_MODES)
    embedding = _embedding_for(predictor, image, embedding, "image")

    sim = similarity_map(predictor, embedding, persam.target_feat.detach().float().cpu())
    positive, negative = location_prior(sim)
    points = persam.prompt_mode == "points"
    box = None
    if points:
        weights = persam.mask_weights.detach().float().cpu().numpy()
        prompt = _prior_prompt(positive, negative)
        first = predictor.decode(embedding, [prompt], multimask=True)
        assert first.low_res_logits is not None
        first_low = np.tensordot(weights, first.low_res_logits[0], axes=1).astype(np.float32)  # L x L
        score = float(weights @ first.iou_scores[0])
    else:
        box = box_prior(sim)
        prompt = Prompt.from_box(box)
        first = predictor.decode(embedding, [prompt], multimask=False)
        assert first.low_res_logits is not None
        first_low = first.low_res_logits[0, 0]
        score = float(first.iou_scores[0, 0])
    with torch.no_grad():
        logits = predictor.upscale(torch.from_numpy(first_low)[None, None], embedding)[0, 0]
    mask = (logits > 0).cpu().numpy()
    cascaded = False
    if cascade and mask.any():
        refine = Prompt(box=_box_of(mask), point_coords=prompt.point_coords, point_labels=prompt.point_labels,
                        mask_input=first_low[None])
        second = predictor.decode(embedding, [refine], multimask=points, return_low_res=False)
        best = int(np.argmax(second.iou_scores[0]))
        mask, score, cascaded = second.masks[0, best], float(second.iou_scores[0, best]), True
    info = {"score": score, "prompt_mode": persam.prompt_mode, "point": positive, "negative_point": negative,
            "box": None if box is None else box.tolist(), "similarity_max": float(sim.max()), "cascaded": cascaded}
    return np.ascontiguousarray(mask, dtype=bool), info


# ------------------------------------------------------------------------------------------ artifacts
def _embed_dim(model: LoadedModel) -> int:
    """Channels of the features PerSAM compares (the family's first, decoder-facing level)."""
    return next(iter(model.net.feature_shapes().values()))[0]


def save_persam(out_dir: str | os.PathLike[str], model: LoadedModel, persam: PerSamModel, *,
                metrics: dict[str, Any] | None = None, name: str | None = None) -> AdapterConfig:
    """Write ``persam`` as an adapter artifact (method ``persam``) for ``model``; returns its config.

    ``metrics`` gets the reserved key :data:`ENCODER_ADAPTER_METRIC` (``persam.encoder_adapter_id``).
    """
    if persam.base_model_id != model.model_id:
        raise InvalidInput(f"persam model was fitted on {persam.base_model_id}, not on {model.model_id}",
                           field="persam")
    _check_mode(persam.prompt_mode, PROMPT_MODES)
    metrics = dict(metrics or {})
    if metrics.get(ENCODER_ADAPTER_METRIC, persam.encoder_adapter_id) != persam.encoder_adapter_id:
        raise InvalidInput(f"metrics[{ENCODER_ADAPTER_METRIC!r}] is reserved for the persam model's encoder "
                           "adapter id", field="metrics")
    metrics[ENCODER_ADAPTER_METRIC] = persam.encoder_adapter_id
    tensors = {TARGET_FEAT: persam.target_feat.detach().float().cpu(),
               MASK_WEIGHTS: persam.mask_weights.detach().float().cpu(),
               PROMPT_MODE: torch.tensor([PROMPT_MODES.index(persam.prompt_mode)], dtype=torch.int64)}
    expected = {TARGET_FEAT: (_embed_dim(model),), MASK_WEIGHTS: (N_MULTIMASK,)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise InvalidInput(f"{key} must have shape {shape}, got {tuple(tensors[key].shape)}", field="persam")
    return save_adapter(out_dir, model, tensors, MethodConfig(PersamMethod.name), metrics=metrics, name=name)


def load_persam(model: LoadedModel, path: str | os.PathLike[str]) -> PerSamModel:
    """Read a ``persam`` artifact fitted on ``model``.

    Raises AdapterInvalid for another method's artifact, another base model, a checksum mismatch,
    missing / unexpected / mis-shaped tensors, non-finite values, an unknown prompt mode or a config
    without the encoder adapter id (NotFound without a config). The encoder adapter is checked when
    segmenting (:func:`segment_persam`), so ``model`` may be the base model.
    """
    source = str(path)
    config = read_adapter_config(path)
    if config.method != PersamMethod.name:
        raise AdapterInvalid(f"{source} is a {config.method} artifact, not persam; load it with "
                             "sam_core.adapters.artifact.load_adapter", field="adapter")
    check_base(config, model, source)
    tensors = read_adapter_tensors(path, config)
    expected = {TARGET_FEAT: torch.Size([_embed_dim(model)]), MASK_WEIGHTS: torch.Size([N_MULTIMASK]),
                PROMPT_MODE: torch.Size([1])}
    check_tensors(expected, tensors, source)
    bad = sorted(k for k, v in tensors.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise AdapterInvalid(f"{source}: non-finite values in {', '.join(bad)}", field="adapter")
    mode = tensors[PROMPT_MODE]
    if mode.dtype.is_floating_point or not 0 <= int(mode[0]) < len(PROMPT_MODES):
        raise AdapterInvalid(f"{source}: {PROMPT_MODE} must be an integer in 0..{len(PROMPT_MODES) - 1} "
                             f"({', '.join(PROMPT_MODES)}), got {mode.tolist()} ({mode.dtype})", field="adapter")
    encoder_adapter = config.metrics.get(ENCODER_ADAPTER_METRIC, "")
    if encoder_adapter is not None and not (isinstance(encoder_adapter, str) and encoder_adapter):
        raise AdapterInvalid(f"{source}: the config's metrics lack a valid {ENCODER_ADAPTER_METRIC!r} "
                             "(the encoder adapter id or null)", field="adapter")
    return PerSamModel(target_feat=tensors[TARGET_FEAT].float(), mask_weights=tensors[MASK_WEIGHTS].float(),
                       base_model_id=config.base_model_id, prompt_mode=PROMPT_MODES[int(mode[0])],
                       encoder_adapter_id=encoder_adapter)
