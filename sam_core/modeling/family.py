"""The model-family seam: what the predictor, caches, training, export and services may ask of a model.

A *family* is one generation of promptable segmentation networks (SAM 1 with its ViT or TinyViT encoders
today; SAM 2.1's Hiera with multi-scale features next). Every network samforge loads is a
:class:`SegmentationModel` — an ``nn.Module`` whose parameter names are the official checkpoint's — and
callers talk only to this interface, never to a family's submodules:

- **preprocessing**: :class:`ModelSpec` (input side, embedding grid, normalisation), carried by
  ``LoadedModel.spec``;
- **encode**: ``B x 3 x S x S`` preprocessed images -> :data:`Features`, named feature tensors
  (``feature_names``; SAM 1: one, ``image_embed`` ``B x C x h x w``);
- **decode**: features of one image + :class:`PromptBatch` (B prompts of one signature) -> ``B x M x L x L``
  low-resolution logits and ``B x M`` predicted IoU (M = 3 with multimask, else 1), through a
  :class:`MaskDecoding` object that may keep per-image state between calls (a memo of shared products);
- **training**: :meth:`SegmentationModel.decode_per_item` (every prompt against its own image's features,
  with autograd), the parameter groups a fine-tuning method may target (:class:`ParamGroup`) and the
  attention projections it may adapt (:class:`AttentionSite`);
- **sharing**: :meth:`SegmentationModel.sharing_encoder` — a model that shares the image and prompt
  encoders' modules and owns a copy of the mask decoder (what a decoder-only adapter needs);
- **frozen prefix**: :meth:`SegmentationModel.encoder_prefix` cuts the image encoder before the stage holding
  the first module a method trains (:class:`EncoderPrefix`), so training can cache the prefix's activations
  once per image and run only the suffix (None: the family offers no cut there).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

Features = dict[str, torch.Tensor]
"""Named feature tensors of a batch of images: name -> ``B x C_l x h_l x w_l`` (float32), in the model's
``feature_names`` order; the first is the image embedding prompts attend to."""

EncoderOutput = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
"""An inference encoder's output: one tensor, one per feature level in ``feature_names`` order, or a mapping
from level name to tensor (e.g. a served model's named outputs)."""


def image_embedding(features: Features) -> torch.Tensor:
    """The first level of ``features``: the image embedding prompts attend to (B x C x h x w)."""
    return next(iter(features.values()))


def named_features(names: Sequence[str], output: EncoderOutput) -> Features:
    """``output`` (a tensor, a sequence of tensors in ``names`` order, or a name -> tensor mapping) ->
    ``{name: tensor}`` in ``names`` order. ValueError when the levels do not match ``names``."""
    if isinstance(output, Mapping):
        if sorted(output) != sorted(names):
            raise ValueError(f"the encoder gave feature levels {sorted(output)}, this model has {list(names)}")
        return {name: output[name] for name in names}
    tensors = [output] if isinstance(output, torch.Tensor) else list(output)
    if len(tensors) != len(names) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"the encoder gave {len(tensors)} feature tensors, this model has {len(names)}: {names}")
    return dict(zip(names, tensors, strict=True))

IMAGE_NORMALIZATIONS = ("imagenet", "minmax")
RESIZE_MODES = ("longest_side", "square")
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelSpec:
    """How a model wants its input.

    ``normalization`` is ``"imagenet"`` (SAM: (x - mean) / std on 0..255 pixels) or ``"minmax"``
    (LiteMedSAM: per-image (x - min) / (max - min) to [0, 1] after the resize). ``family`` names the
    :class:`SegmentationModel` implementation (adapters record it; loading one onto another family is refused).
    ``resize`` is ``"longest_side"`` (SAM 1: scale the longest side to ``img_size`` keeping the aspect ratio,
    zero-pad the rest; pixels 0..255) or ``"square"`` (SAM 2's ``SAM2Transforms``: pixels to 0..1, then an
    antialiased bilinear resize to ``img_size x img_size`` ignoring the aspect ratio, no padding; mean and std
    are then in 0..1 units). :mod:`sam_core.modeling.preprocess` implements both.
    """

    name: str
    img_size: int
    embedding_size: int
    normalization: str
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    family: str = "sam1"
    resize: str = "longest_side"

    def __post_init__(self) -> None:
        if self.normalization not in IMAGE_NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {IMAGE_NORMALIZATIONS}, got {self.normalization!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4x the embedding grid)."""
        return self.embedding_size * 4

    @property
    def preprocess_version(self) -> str:
        if self.resize == "square":
            return f"{self.normalization}-square-{self.img_size}-v1"
        resize = "cv2area" if self.normalization == "minmax" else "pilbilinear"
        return f"{self.normalization}-{resize}-{self.img_size}-v1"


class ParamGroup(enum.Enum):
    """Parts of a model a fine-tuning method may train."""

    IMAGE_ENCODER = "image_encoder"
    ENCODER_ATTENTION = "encoder_attention"  # the image encoder's fused qkv projections
    PROMPT_ENCODER = "prompt_encoder"
    MASK_DECODER = "mask_decoder"


@dataclass(frozen=True)
class PromptBatch:
    """B prompts of one signature in the model's input frame (pixels of the resized, unpadded image).

    points: (B x N x 2 float32 coordinates, B x N int labels) or None; boxes: B x 4 float32 (x0, y0, x1, y1)
    or None; masks: B x 1 x L x L float32 low-res mask logits or None.
    """

    points: tuple[torch.Tensor, torch.Tensor] | None = None
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of the image encoder that LoRA or an adapter may change.

    ``owner.<attr>`` is ``attn`` (an adapter replaces that attribute with a wrapped attention);
    ``attn.qkv`` is the fused ``dim -> 3 * dim``-like projection (LoRA wraps it); ``q_channels`` /
    ``v_channels`` are its output channels holding q and v; ``dim`` is the attention's output width.
    """

    name: str
    owner: nn.Module
    attr: str
    attn: nn.Module
    q_channels: torch.Tensor
    v_channels: torch.Tensor
    dim: int


@dataclass(frozen=True)
class EncoderPrefix:
    """The image encoder cut before its stage ``cut`` (a module name such as ``image_encoder.layers.1``).

    ``prefix``: B x 3 x S x S preprocessed images -> the activations entering ``cut`` (one tensor, batch
    first); ``suffix``: those activations -> the named features, with autograd. ``suffix(prefix(x))`` runs
    the same operations as :meth:`SegmentationModel.encode`.
    """

    cut: str
    prefix: Callable[[torch.Tensor], torch.Tensor]
    suffix: Callable[[torch.Tensor], Features]


class MaskDecoding(Protocol):
    """Inference decoding against one image's features (may remember products of the last call)."""

    def __call__(self, features: Features, prompts: PromptBatch, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """features of one image (1 x C x h x w each) -> (B x M x L x L low-res logits, B x M IoU)."""
        ...


class SegmentationModel(nn.Module):
    """Abstract base of every family's network (see the module docstring for the contract)."""

    feature_names: tuple[str, ...] = ()

    def encode(self, batch: torch.Tensor) -> Features:
        """B x 3 x S x S preprocessed images -> named features (autograd follows the caller's mode)."""
        raise NotImplementedError

    def inference_encoder(self, optimize: bool = True) -> nn.Module:
        """A module mapping B x 3 x S x S -> the feature tensors for inference: one tensor (one level) or a
        tuple in ``feature_names`` order. With ``optimize`` a snapshot copy rewritten for speed (same results
        to float32 rounding), else the encoder itself."""
        raise NotImplementedError

    def features_from_encoder(self, output: EncoderOutput) -> Features:
        """What :meth:`inference_encoder`'s output (or an exported encoder's: one tensor, or a sequence in
        ``feature_names`` order) means as named features. Raises ValueError on a wrong count of levels."""
        raise NotImplementedError

    def mask_decoding(self, fast: bool = True) -> MaskDecoding:
        """A decoder for inference calls (``fast``: the family's optimised decoder where it has one)."""
        raise NotImplementedError

    def decode_per_item(self, features: Features, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts, prompt i against image i's features (B x C x h x w each), one mask each, with
        autograd -> (B x 1 x L x L low-res logits, B x 1 IoU predictions). The training step."""
        raise NotImplementedError

    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        """name -> (C, h, w) of one image's features."""
        raise NotImplementedError

    @property
    def num_multimask_outputs(self) -> int:
        """M of a multimask decode."""
        raise NotImplementedError

    def group_modules(self, group: ParamGroup) -> list[nn.Module]:
        """The modules whose parameters make up ``group``."""
        raise NotImplementedError

    def attention_sites(self) -> list[AttentionSite]:
        """Every attention layer of the image encoder, in order."""
        raise NotImplementedError

    def sharing_encoder(self) -> SegmentationModel:
        """A new model sharing this one's image and prompt encoders (same module objects) with its own deep
        copy of the mask decoder."""
        raise NotImplementedError

    def encoder_prefix(self, first_trained: str) -> EncoderPrefix | None:
        """The encoder cut before the stage holding module ``first_trained`` (a name in ``named_modules``), or
        None when no stage precedes it or the family has no cut there (then nothing is cached)."""
        return None

    def encoder_blocks(self) -> list[nn.Module]:
        """The image encoder's repeated blocks in forward order (each called as ``block(x)``): the units gradient
        checkpointing recomputes (:mod:`sam_core.training.grad_checkpoint`). None by default."""
        return []

    def group_parameters(self, group: ParamGroup) -> Iterator[nn.Parameter]:
        for module in self.group_modules(group):
            yield from module.parameters()


class DensePositionalEncoding:
    """A prompt encoder's ``get_dense_pe()`` (1 x C x h x w), kept while its Gaussian matrix is unchanged: keyed
    on the buffer object (``.to(device)`` replaces it), its in-place version counter (``load_state_dict`` or a
    training step bumps it) and the embedding grid. SAM 1's and SAM 2's prompt encoders share these names."""

    def __init__(self, prompt_encoder: Any) -> None:  # segment_anything's or sam2's untyped PromptEncoder
        self.encoder = prompt_encoder
        self._cached: tuple[torch.Tensor, tuple[int, tuple[int, ...]], torch.Tensor] | None = None

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        gauss: torch.Tensor = self.encoder.pe_layer.positional_encoding_gaussian_matrix
        try:
            key = (int(gauss._version), tuple(int(v) for v in self.encoder.image_embedding_size))
        except RuntimeError:  # an inference tensor has no version counter: do not cache
            fresh: torch.Tensor = self.encoder.get_dense_pe()
            return fresh
        cached = self._cached  # holding the matrix pins its id
        if cached is None or cached[0] is not gauss or cached[1] != key:
            cached = (gauss, key, self.encoder.get_dense_pe())
            self._cached = cached
        return cached[2]
