"""The SAM 2 family: SAM 2 / SAM 2.1 image models (Hiera trunk + FPN neck) and the ``tiny_sam2`` test model.

:class:`Sam2Model` holds the image parts of the official ``sam2.modeling.sam2_base.SAM2Base`` under their
official attribute names (``image_encoder``, ``sam_prompt_encoder``, ``sam_mask_decoder``, ``no_mem_embed``), so
an official checkpoint ``{"model": state_dict}`` loads by name. The video parts (memory attention / encoder,
object pointers, temporal encodings) are not built; their checkpoint keys (:data:`VIDEO_ONLY_KEYS`) are dropped
by :func:`image_state` before the registry's strict load, and every other key must match.

Features (``feature_names``, for a 1024 px model; ``E = img_size / 16``):

- ``image_embed``: ``B x 256 x E x E`` = the FPN's stride-16 level + ``no_mem_embed`` (as
  ``SAM2ImagePredictor.set_image`` adds it when ``directly_add_no_mem_embed``);
- ``high_res_feat_s0``: ``B x 32 x 4E x 4E`` = ``sam_mask_decoder.conv_s0`` of the stride-4 level;
- ``high_res_feat_s1``: ``B x 64 x 2E x 2E`` = ``sam_mask_decoder.conv_s1`` of the stride-8 level.

That is exactly what ``SAM2ImagePredictor._features`` caches (``image_embed``, ``high_res_feats[0..1]``).
Because ``conv_s0`` / ``conv_s1`` run at encode time their outputs are cached with the embedding, so they belong
to the ``IMAGE_ENCODER`` parameter group (with the trunk and neck), not to ``MASK_DECODER``; a decoder-only
adapter therefore never changes a cached feature. ``no_mem_embed`` (one learned per-channel offset of the video
model) is in no group: every method keeps it frozen.

Decoding follows ``SAM2ImagePredictor._predict``: a box becomes two points labelled 2 and 3 placed before the
clicks, the prompt encoder always pads the points, the official ``MaskDecoder`` gets both high-resolution
levels, and a single-mask decode in eval mode falls back to the best multimask output when the single mask is
unstable (``dynamic_multimask_via_stability``, as ``build_sam2`` configures it). :meth:`decode_per_item`
(training) always takes the single-mask token, as the official decoder does in training mode.
``mask_decoding(fast=True)`` (the default) decodes through SAM 1's re-associated
:class:`~sam_core.modeling.fast_decoder.FastMaskDecoder`, whose identities hold for SAM 2's decoder unchanged
(see its module docstring; same logits to float32 rounding, tests/sam_core/test_fast_decoder_sam2.py);
``fast=False`` runs the official decoder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from sam2.modeling.backbones.hieradet import Hiera, MultiScaleAttention
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from torch import nn

from sam_core.modeling.family import (
    AttentionSite,
    DensePositionalEncoding,
    EncoderOutput,
    Features,
    MaskDecoding,
    ModelSpec,
    ParamGroup,
    PromptBatch,
    SegmentationModel,
    named_features,
)
from sam_core.modeling.fast_decoder import FastMaskDecoder

FEATURE_NAMES = ("image_embed", "high_res_feat_s0", "high_res_feat_s1")
EMBED, HIGH_RES_S0, HIGH_RES_S1 = FEATURE_NAMES
BACKBONE_STRIDE = 16  # SAM2Base's default; the image embedding grid is img_size / 16
BOX_LABELS = (2, 3)  # SAM 2 encodes a box as its two corners with these point labels
# Official SAM2Base keys of the video model only: memory attention / encoder, object pointers and temporal
# encodings. Image prediction never reads them; image_state() drops them, every other key must match.
VIDEO_ONLY_KEYS = ("memory_attention.", "memory_encoder.", "mask_downsample.", "obj_ptr_proj.",
                   "obj_ptr_tpos_proj.", "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")
_HIGH_RES_CONVS = ("conv_s0", "conv_s1")


@dataclass(frozen=True)
class HeadConfig:
    """The SAM heads' hyper-parameters (``SAM2Base._build_sam_heads`` plus the config's decoder options)."""

    hidden_dim: int
    image_size: int
    mlp_dim: int = 2048
    num_heads: int = 8
    iou_hidden: int = 256
    mask_in_chans: int = 16
    directly_add_no_mem_embed: bool = True
    decoder_args: dict[str, Any] = field(default_factory=dict)


class Sam2Model(SegmentationModel):
    """SAM 2's image path behind the family interface (see the module docstring)."""

    feature_names = FEATURE_NAMES

    def __init__(self, image_encoder: ImageEncoder, heads: HeadConfig) -> None:
        super().__init__()
        grid = heads.image_size // BACKBONE_STRIDE
        self.image_encoder = image_encoder
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=heads.hidden_dim, image_embedding_size=(grid, grid),
            input_image_size=(heads.image_size, heads.image_size), mask_in_chans=heads.mask_in_chans)
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=heads.hidden_dim, mlp_dim=heads.mlp_dim,
                                          num_heads=heads.num_heads),
            transformer_dim=heads.hidden_dim, iou_head_depth=3, iou_head_hidden_dim=heads.iou_hidden,
            use_high_res_features=True, **heads.decoder_args)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, heads.hidden_dim))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)
        self.directly_add_no_mem_embed = heads.directly_add_no_mem_embed
        self.image_size = heads.image_size

    # ------------------------------------------------------------------ encode
    def encode(self, batch: torch.Tensor) -> Features:
        levels = self.image_encoder(batch)["backbone_fpn"]
        embed = levels[-1]
        if self.directly_add_no_mem_embed:
            embed = embed + self.no_mem_embed.view(1, -1, 1, 1)
        return {EMBED: embed,
                HIGH_RES_S0: self.sam_mask_decoder.conv_s0(levels[0]),
                HIGH_RES_S1: self.sam_mask_decoder.conv_s1(levels[1])}

    def inference_encoder(self, optimize: bool = True) -> nn.Module:
        """Maps B x 3 x S x S to the tuple of features in ``feature_names`` order. SAM 2 has no rewritten
        encoder yet: ``optimize`` gives a frozen snapshot copy of this model's encoder side, else a view of
        the live modules."""
        source = copy.deepcopy(self).requires_grad_(False).eval() if optimize else self
        return _TupleEncoder(source)

    def features_from_encoder(self, output: EncoderOutput) -> Features:
        return named_features(FEATURE_NAMES, output)

    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        dim = int(self.sam_prompt_encoder.embed_dim)
        grid = int(self.sam_prompt_encoder.image_embedding_size[0])
        return {EMBED: (dim, grid, grid), HIGH_RES_S0: (dim // 8, 4 * grid, 4 * grid),
                HIGH_RES_S1: (dim // 4, 2 * grid, 2 * grid)}

    # ------------------------------------------------------------------ decode
    @property
    def num_multimask_outputs(self) -> int:
        return int(self.sam_mask_decoder.num_multimask_outputs)

    def prompt_embeddings(self, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x P x C sparse, B x C x h x w dense) as ``SAM2ImagePredictor._predict``: boxes as labelled points."""
        points = prompts.points
        if prompts.boxes is not None:
            corners = prompts.boxes.reshape(-1, 2, 2)
            labels = torch.tensor([BOX_LABELS], dtype=torch.int, device=corners.device).repeat(corners.shape[0], 1)
            if points is not None:
                points = (torch.cat([corners, points[0]], dim=1), torch.cat([labels, points[1].int()], dim=1))
            else:
                points = (corners, labels)
        sparse, dense = self.sam_prompt_encoder(points=points, boxes=None, masks=prompts.masks)
        return sparse, dense

    def run_decoder(self, features: Features, prompts: PromptBatch,
                    multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The official mask decoder on ``features`` (batch 1: shared by every prompt; else one per prompt)."""
        sparse, dense = self.prompt_embeddings(prompts)
        embed = features[EMBED]
        low_res, iou, _, _ = self.sam_mask_decoder(
            image_embeddings=embed, image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            repeat_image=embed.shape[0] != sparse.shape[0],
            high_res_features=[features[HIGH_RES_S0], features[HIGH_RES_S1]])
        return low_res, iou

    def mask_decoding(self, fast: bool = True) -> MaskDecoding:
        return Sam2FastDecoding(self) if fast else Sam2Decoding(self)

    def decode_per_item(self, features: Features, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt i against image i's features; the single-mask token (the official training-mode output).
        The prompt encoder runs without autograd (never trained)."""
        with torch.no_grad():
            sparse, dense = self.prompt_embeddings(prompts)
        decoder = self.sam_mask_decoder
        masks, iou, _, _ = decoder.predict_masks(
            image_embeddings=features[EMBED], image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, repeat_image=False,
            high_res_features=[features[HIGH_RES_S0], features[HIGH_RES_S1]])
        return masks[:, 0:1], iou[:, 0:1]

    # ------------------------------------------------------------------ parameters
    def group_modules(self, group: ParamGroup) -> list[nn.Module]:
        decoder = self.sam_mask_decoder
        if group is ParamGroup.IMAGE_ENCODER:
            return [self.image_encoder, *(getattr(decoder, name) for name in _HIGH_RES_CONVS)]
        if group is ParamGroup.ENCODER_ATTENTION:
            return [_module(site.attn, "qkv") for site in self.attention_sites()]
        if group is ParamGroup.PROMPT_ENCODER:
            return [self.sam_prompt_encoder]
        return [module for name, module in decoder.named_children() if name not in _HIGH_RES_CONVS]

    def encoder_blocks(self) -> list[nn.Module]:
        """The Hiera trunk's blocks."""
        return list(self.image_encoder.trunk.blocks)

    def attention_sites(self) -> list[AttentionSite]:
        """Every Hiera block's ``MultiScaleAttention``: ``qkv`` is ``dim -> 3 * dim_out`` laid out
        ``[q | k | v]`` (all heads each), so q and v are the first and last ``dim_out`` channels."""
        sites = []
        for index, block in enumerate(self.image_encoder.trunk.blocks):
            attn = block.attn
            if isinstance(attn, MultiScaleAttention):
                dim = int(attn.dim_out)
                sites.append(AttentionSite(name=f"image_encoder.trunk.blocks.{index}.attn", owner=block,
                                           attr="attn", attn=attn, q_channels=torch.arange(0, dim),
                                           v_channels=torch.arange(2 * dim, 3 * dim), dim=dim))
        return sites

    def sharing_encoder(self) -> Sam2Model:
        """Shares the image encoder, ``conv_s0`` / ``conv_s1`` (encoder side), ``no_mem_embed`` and the prompt
        encoder; the rest of the mask decoder is a deep copy."""
        shared = Sam2Model.__new__(Sam2Model)
        nn.Module.__init__(shared)
        shared.image_encoder = self.image_encoder
        shared.sam_prompt_encoder = self.sam_prompt_encoder
        convs = {name: getattr(self.sam_mask_decoder, name) for name in _HIGH_RES_CONVS}
        memo = {id(module): module for module in convs.values()}  # deepcopy keeps these objects
        shared.sam_mask_decoder = copy.deepcopy(self.sam_mask_decoder, memo)
        shared.no_mem_embed = self.no_mem_embed
        shared.directly_add_no_mem_embed = self.directly_add_no_mem_embed
        shared.image_size = self.image_size
        shared.train(self.training)
        return shared


class _TupleEncoder(nn.Module):
    """``model.encode`` as a tuple in ``feature_names`` order (what exporters and the encoder backends take)."""

    def __init__(self, model: Sam2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.encode(batch)
        return tuple(features[name] for name in FEATURE_NAMES)


class Sam2Decoding:
    """Inference decoding for :class:`Sam2Model` (the official prompt encoder and mask decoder)."""

    def __init__(self, model: Sam2Model) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, features: Features, prompts: PromptBatch, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.run_decoder(features, prompts, multimask)


class Sam2FastDecoding:
    """Inference decoding for :class:`Sam2Model` through the re-associated
    :class:`~sam_core.modeling.fast_decoder.FastMaskDecoder` (same logits and IoU as :class:`Sam2Decoding` to
    float32 rounding). Without mask inputs every prompt shares one dense embedding, so the first block's
    image-side products are computed once per call and kept while the embedding is the same one (the dense
    positional encoding is kept while the prompt encoder's Gaussian matrix is unchanged). A single-mask decode
    in eval mode gets every mask token and applies the official stability fallback to them."""

    def __init__(self, model: Sam2Model) -> None:
        self.model = model
        self.fast = FastMaskDecoder.for_decoder(model.sam_mask_decoder)
        self.dense_pe = DensePositionalEncoding(model.sam_prompt_encoder)

    @torch.inference_mode()
    def __call__(self, features: Features, prompts: PromptBatch, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.model.sam_mask_decoder
        sparse, dense = self.model.prompt_embeddings(prompts)
        fallback = not multimask and decoder.dynamic_multimask_via_stability and not decoder.training
        low_res, iou = self.fast(features[EMBED], self.dense_pe(), sparse,
                                 dense[:1] if prompts.masks is None else dense, multimask,
                                 high_res=(features[HIGH_RES_S0], features[HIGH_RES_S1]), all_masks=fallback)
        if fallback:  # the official selection, on the official module (token 0 unless unstable)
            low_res, iou = decoder._dynamic_multimask_via_stability(low_res, iou)
        return low_res, iou


def _module(owner: nn.Module, name: str) -> nn.Module:
    module = getattr(owner, name)
    assert isinstance(module, nn.Module), f"{name} is not a module"
    return module


def image_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official SAM 2 state dict without its video-only keys (:data:`VIDEO_ONLY_KEYS`)."""
    return {name: tensor for name, tensor in state.items() if not name.startswith(VIDEO_ONLY_KEYS)}


# ---------------------------------------------------------------------------------------------- builders
POSTPROCESSING_OVERRIDES = (  # what build_sam2(apply_postprocessing=True) sets for SAM2ImagePredictor
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)
_DECODER_FLAGS = ("iou_prediction_use_sigmoid", "pred_obj_scores", "pred_obj_scores_mlp",
                  "use_multimask_token_for_obj_ptr")


def from_config(config_file: str) -> Sam2Model:
    """The image model of a config shipped in the ``sam2`` package (e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``),
    composed with hydra as ``build_sam2`` does (nothing is downloaded), randomly initialised."""
    import sam2  # noqa: F401  # initialises hydra's config search path on the sam2 package
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(config_name=config_file, overrides=list(POSTPROCESSING_OVERRIDES))
    OmegaConf.resolve(cfg)
    model_cfg = cfg.model
    if not model_cfg.get("use_high_res_features_in_sam", False):
        raise ValueError(f"{config_file}: the SAM 2 family needs use_high_res_features_in_sam")
    encoder = instantiate(model_cfg.image_encoder, _recursive_=True)
    decoder_args: dict[str, Any] = {flag: bool(model_cfg.get(flag, False)) for flag in _DECODER_FLAGS}
    extra = OmegaConf.to_container(model_cfg.get("sam_mask_decoder_extra_args") or {})
    assert isinstance(extra, dict), f"{config_file}: sam_mask_decoder_extra_args is not a mapping"
    decoder_args.update({str(key): value for key, value in extra.items()})
    heads = HeadConfig(hidden_dim=int(encoder.neck.d_model), image_size=int(model_cfg.image_size),
                       directly_add_no_mem_embed=bool(model_cfg.get("directly_add_no_mem_embed", False)),
                       decoder_args=decoder_args)
    return Sam2Model(encoder, heads).eval()


def tiny_sam2(spec: ModelSpec) -> Sam2Model:
    """A ~0.35M-parameter SAM 2 (Hiera 16-128 channels in 5 blocks, 32-channel neck and heads, 128 px input:
    8 x 8 embedding, 32 x 32 / 16 x 16 high-res levels, 32 x 32 low-res masks), SAM 2.1's decoder options."""
    dims = [16, 32, 64, 128]
    trunk = Hiera(embed_dim=dims[0], num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                  window_pos_embed_bkg_spatial_size=(4, 4), window_spec=(8, 4, 4, 2))
    neck = FpnNeck(position_encoding=PositionEmbeddingSine(num_pos_feats=32, normalize=True, temperature=10000),
                   d_model=32, backbone_channel_list=dims[::-1], fpn_top_down_levels=[2, 3],
                   fpn_interp_model="nearest")
    decoder_args: dict[str, Any] = dict.fromkeys(_DECODER_FLAGS, True)
    decoder_args.update(dynamic_multimask_via_stability=True, dynamic_multimask_stability_delta=0.05,
                        dynamic_multimask_stability_thresh=0.98)
    heads = HeadConfig(hidden_dim=32, image_size=spec.img_size, mlp_dim=64, num_heads=2, iou_hidden=32,
                       mask_in_chans=4, decoder_args=decoder_args)
    return Sam2Model(ImageEncoder(trunk=trunk, neck=neck, scalp=1), heads).eval()
