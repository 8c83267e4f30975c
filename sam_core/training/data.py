"""Training data: instances of a data set split, each seen through a window (the whole image or a
native-resolution crop around it, on a grid so that neighbours share it: :func:`crop_window`), turned into
batches of model inputs or cached embeddings, simulated prompts and low-resolution targets.

A prompt depends on (seed, step, position in the global batch) only, so it is the same whichever DDP rank
draws it; embeddings of the frozen encoder are cached in memory and, when given, in an
:class:`~sam_core.inference.embedding_store.EmbeddingStore`; with a :class:`PrefixCache` (``lora``,
``adapter``) a batch carries the windows' frozen-prefix activations instead of their images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import torch

from sam_core.data.dataset import SegmentationDataset
from sam_core.data.prompt_sim import PromptConfig, simulate_prompt
from sam_core.data.samples import Sample
from sam_core.errors import InvalidInput
from sam_core.inference.embedding_cache import embedding_key
from sam_core.inference.embedding_store import EmbeddingStore
from sam_core.inference.predictor import Predictor
from sam_core.inference.types import Embedding
from sam_core.io.images import image_content_hash
from sam_core.modeling.family import Features, ModelSpec, PromptBatch
from sam_core.modeling.preprocess import preprocess, transform_boxes, transform_coords
from sam_core.training.prefix_cache import PrefixCache


def low_res_target(mask: np.ndarray, spec: ModelSpec, low_res: int) -> np.ndarray:
    """H x W bool -> L x L float32 target in the decoder's low-res frame (resized like the image: longest side
    then padded, or to a square for ``spec.resize == "square"``)."""
    h, w = mask.shape
    if spec.resize == "square":
        th, tw = low_res, low_res
    else:
        scale = low_res / max(h, w)
        th, tw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    small = cv2.resize(mask.astype(np.float32), (tw, th), interpolation=cv2.INTER_AREA) >= 0.5
    out = np.zeros((low_res, low_res), np.float32)
    out[:th, :tw] = small
    return out


Window = tuple[int, int, int, int]  # y0, x0, y1, x1 in the original image


def crop_window(mask: np.ndarray, crop: int | None) -> Window:
    """A ``crop`` x ``crop`` native-resolution window around the instance, clipped to the image.

    Windows sit on a grid of stride ``crop // 2`` per axis (the last start flush with the image's end): of the
    grid windows that contain the instance's extent, the one that centres it best, so that neighbouring
    instances share a window and its cached embedding (on dense data, such as cells, one window per instance
    would cost one encoder pass per instance). An instance no grid window contains (wider than half a crop)
    gets a window centred on it. The whole image when ``crop`` is None, the image is no larger than the crop,
    or the instance does not fit in one (those are trained at the whole-image scale).
    """
    h, w = mask.shape
    if crop is None or (h <= crop and w <= crop):
        return (0, 0, h, w)
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if ys[-1] - ys[0] + 1 > crop or xs[-1] - xs[0] + 1 > crop:
        return (0, 0, h, w)
    y0, x0 = grid_start(int(ys[0]), int(ys[-1]), h, crop), grid_start(int(xs[0]), int(xs[-1]), w, crop)
    return (y0, x0, min(h, y0 + crop), min(w, x0 + crop))


def grid_start(lo: int, hi: int, length: int, crop: int) -> int:
    """The start of the window (see :func:`crop_window`) on one axis of ``length`` pixels for an extent
    ``lo..hi`` (inclusive)."""
    if length <= crop:
        return 0
    centred = min(max((lo + hi + 1) // 2 - crop // 2, 0), length - crop)
    fitting = _fitting_starts(lo, hi, length, crop)
    return min(fitting, key=lambda start: (abs(start - centred), start)) if fitting else centred


def grid_windows(mask: np.ndarray, crop: int) -> tuple[Window, ...]:
    """Every window of :func:`crop_window`'s grid that contains the instance (its most central one first), or
    just :func:`crop_window`'s window when no grid window does: where tiled inference may see the instance."""
    h, w = mask.shape
    central = crop_window(mask, crop)
    if central == (0, 0, h, w):
        return (central,)
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    y_starts = _fitting_starts(int(ys[0]), int(ys[-1]), h, crop)
    x_starts = _fitting_starts(int(xs[0]), int(xs[-1]), w, crop)
    others = [(y0, x0, min(h, y0 + crop), min(w, x0 + crop)) for y0 in y_starts for x0 in x_starts]
    return (central, *sorted(set(others) - {central}))


def _fitting_starts(lo: int, hi: int, length: int, crop: int) -> list[int]:
    if length <= crop:
        return [0]
    starts = {*range(0, length - crop + 1, max(1, crop // 2)), length - crop}
    return sorted(start for start in starts if start <= lo and hi < start + crop)


@dataclass(frozen=True)
class TrainingItem:
    """One instance of the split seen through its window; ``windows``: the windows a training step may
    choose from instead (empty: ``window`` only)."""

    sample_index: int
    instance_index: int
    window: Window
    windows: tuple[Window, ...] = ()

    def drawn(self, rng: np.random.Generator) -> TrainingItem:
        """This item through one of its ``windows`` drawn with ``rng`` (itself without any)."""
        if len(self.windows) < 2:
            return self
        return replace(self, window=self.windows[int(rng.integers(len(self.windows)))])


class TrainingData:
    """Instances of one data set split, each seen through a window (the whole image, or a native-
    resolution crop around it), with the window's embedding cached for the decoder method."""

    def __init__(self, ds: SegmentationDataset, predictor: Predictor, *, cache_embeddings: bool,
                 store: EmbeddingStore | None, crop: int | None = None, max_instances: int | None = None,
                 all_windows: bool = False) -> None:
        self.ds = ds
        self.predictor = predictor
        self.spec = predictor.spec
        self.crop = crop
        self.max_instances = max_instances  # per image, the first ones (None = all)
        self.items: list[TrainingItem] = []
        for i in range(len(ds)):
            for j, inst in enumerate(ds[i].instances[:max_instances]):
                windows = grid_windows(inst.mask, crop) if all_windows and crop is not None else ()
                self.items.append(TrainingItem(i, j, crop_window(inst.mask, crop), windows))
        if not self.items:
            raise InvalidInput("the split has no instances", field="data")
        self.embeddings: dict[tuple[int, Window], Embedding] = {}
        self.inputs: dict[tuple[int, Window], torch.Tensor] = {}
        self.store = store
        self.cache_embeddings = cache_embeddings
        self.prefix: PrefixCache | None = None  # set by the loop when the method's encoder prefix is cached

    @property
    def windows(self) -> list[tuple[int, Window]]:
        """Distinct (sample, window) pairs, every item's ``windows`` included: what the decoder method embeds once."""
        return list(dict.fromkeys((it.sample_index, window) for it in self.items
                                  for window in (it.window, *it.windows)))

    def view(self, index: int, window: Window) -> np.ndarray:
        y0, x0, y1, x1 = window
        return np.ascontiguousarray(self.ds[index].load_image()[y0:y1, x0:x1])

    def embedding(self, index: int, window: Window) -> Embedding:
        if (index, window) not in self.embeddings:
            image = self.view(index, window)
            key = embedding_key(image_content_hash(image), self.predictor.model_id,
                                self.spec.preprocess_version, None)
            def compute() -> Embedding:
                return self.predictor.encode_one(image)

            store = self.store
            self.embeddings[index, window] = compute() if store is None else store.get_or_compute(key, compute)
        return self.embeddings[index, window]

    def prefix_activations(self, index: int, window: Window) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The view's frozen-prefix activations (see :meth:`PrefixCache.activations`), from the cache's store."""
        assert self.prefix is not None
        image = self.view(index, window)
        return self.prefix.activations(image_content_hash(image), lambda: preprocess(image, self.spec)[0][0])

    def model_input(self, index: int, window: Window) -> torch.Tensor:
        """3 x S x S preprocessed view (kept in memory: training splits are small)."""
        if (index, window) not in self.inputs:
            self.inputs[index, window] = preprocess(self.view(index, window), self.spec)[0][0]
        return self.inputs[index, window]

    def prompt_and_mask(self, item: TrainingItem, rng: np.random.Generator, cfg: PromptConfig,
                        sample: Sample | None = None) -> tuple[dict[str, Any], np.ndarray]:
        """-> (prompt dict in window coordinates, window mask h x w bool)."""
        sample = sample or self.ds[item.sample_index]
        y0, x0, y1, x1 = item.window
        mask = sample.instances[item.instance_index].mask[y0:y1, x0:x1]
        return simulate_prompt(mask, rng, cfg), mask

    def batch(self, items: list[tuple[int, TrainingItem]], rng_seed: list[int], prompt_cfg: PromptConfig,
              device: torch.device) -> TrainingBatch:
        """(position in the global batch, item) pairs -> one :class:`TrainingBatch`. A prompt depends on (seed,
        step, position) only, so it is the same whichever rank draws it."""
        size, low = self.spec, self.spec.low_res_size
        images: list[torch.Tensor] = []
        embeds: list[Features] = []
        activations: list[tuple[torch.Tensor, tuple[int, ...]]] = []
        coords: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        boxes: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        samples: dict[int, Sample] = {}
        for k, item in items:
            if item.windows:  # its own stream: prompts stay as they were
                item = item.drawn(np.random.default_rng([*rng_seed, k, 1]))
            sample = samples.setdefault(item.sample_index, self.ds[item.sample_index])
            prompt, mask = self.prompt_and_mask(item, np.random.default_rng([*rng_seed, k]), prompt_cfg, sample)
            if self.cache_embeddings:
                embeds.append(self.embedding(item.sample_index, item.window).features)
            elif self.prefix is not None:
                activations.append(self.prefix_activations(item.sample_index, item.window))
            else:
                images.append(self.model_input(item.sample_index, item.window))
            if prompt["box"] is not None:
                boxes.append(transform_boxes(prompt["box"][None], mask.shape, size)[0])
            if prompt["point_coords"] is not None:
                coords.append(transform_coords(prompt["point_coords"], mask.shape, size))
                labels.append(prompt["point_labels"])
            targets.append(low_res_target(mask, size, low))
        if coords and len({len(c) for c in coords}) > 1:
            n = max(len(c) for c in coords)  # too little background for all negatives: repeat a point
            coords = [np.concatenate([c, np.repeat(c[-1:], n - len(c), 0)]) for c in coords]
            labels = [np.concatenate([lb, np.repeat(lb[-1:], n - len(lb), 0)]) for lb in labels]

        def stacked(arrays: list[np.ndarray], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.as_tensor(np.stack(arrays), dtype=dtype, device=device)

        return TrainingBatch(
            images=torch.stack(images).to(device, torch.float32) if images else None,
            features=stack_features(embeds, device) if embeds else None,
            prompts=PromptBatch(points=(stacked(coords), stacked(labels, torch.int64)) if coords else None,
                                boxes=stacked(boxes) if boxes else None),
            targets=stacked(targets)[:, None],
            activations=PrefixCache.assemble(activations, device) if activations else None,
        )


@dataclass
class TrainingBatch:
    """B instances: their preprocessed images (B x 3 x S x S), or for a frozen encoder their cached features, or
    for a frozen encoder prefix its cached activations (B x ...); one prompt each in the model's input frame;
    low-res targets B x 1 x L x L."""

    images: torch.Tensor | None
    features: Features | None
    prompts: PromptBatch
    targets: torch.Tensor
    activations: torch.Tensor | None = None


def stack_features(per_image: list[Features], device: torch.device | str) -> Features:
    """B images' named features (1 x C_l x h_l x w_l each) -> one batch (name -> B x C_l x h_l x w_l)."""
    return {name: torch.cat([f[name] for f in per_image]).to(device) for name in per_image[0]}
