"""``lora``: SAMed-style LoRA on the query and value projections of every image-encoder attention (rank 4 by
default) plus the mask decoder.

SAM and TinyViT fuse q, k, v into one ``qkv`` Linear, so peft's LoRA (which adapts whole Linear outputs, i.e.
q, k *and* v) does not express SAMed's q/v-only update; :class:`QVLoRA` adds two low-rank updates into the q
and v output channels the family reports (:class:`~sam_core.modeling.family.AttentionSite`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sam_core.errors import InvalidInput
from sam_core.modeling.family import ParamGroup, SegmentationModel
from sam_core.training.methods.base import FineTuningMethod, MethodConfig


class QVLoRA(nn.Module):
    """A frozen fused ``qkv`` Linear plus low-rank updates on its q and v output channels.

    out = qkv(x); out[..., q_idx] += s * B_q(A_q(x)); out[..., v_idx] += s * B_v(A_v(x)), s = alpha / rank.
    x: ... x dim -> ... x qkv.out_features. B is zero-initialised, so a fresh QVLoRA equals the base.
    """

    def __init__(self, base: nn.Linear, q_idx: torch.Tensor, v_idx: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.register_buffer("q_idx", q_idx.long(), persistent=False)
        self.register_buffer("v_idx", v_idx.long(), persistent=False)
        self.lora_A_q = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B_q = nn.Linear(rank, len(q_idx), bias=False)
        self.lora_A_v = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B_v = nn.Linear(rank, len(v_idx), bias=False)
        for a, b in ((self.lora_A_q, self.lora_B_q), (self.lora_A_v, self.lora_B_v)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # as peft / SAMed
            nn.init.zeros_(b.weight)

    def low_rank_layers(self) -> list[nn.Linear]:
        return [self.lora_A_q, self.lora_B_q, self.lora_A_v, self.lora_B_v]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        dq = self.lora_B_q(self.lora_A_q(x)) * self.scale
        dv = self.lora_B_v(self.lora_A_v(x)) * self.scale
        updated: torch.Tensor = out.index_add(-1, self.q_idx, dq).index_add(-1, self.v_idx, dv)
        return updated


class LoraMethod(FineTuningMethod):
    name = "lora"
    summary = "LoRA on the image encoder's q/v projections + mask decoder (SAMed)"
    recommended_lr = 3e-4
    changes_image_encoder = True
    trained_groups = (ParamGroup.MASK_DECODER,)

    def inject(self, net: SegmentationModel, cfg: MethodConfig) -> None:
        for site in net.attention_sites():
            if not isinstance(site.attn.qkv, nn.Linear):
                raise InvalidInput(f"{site.name}.qkv is already adapted ({type(site.attn.qkv).__name__})",
                                   field="method")
            site.attn.qkv = QVLoRA(site.attn.qkv, site.q_channels, site.v_channels, cfg.rank, cfg.alpha)

    def injected_modules(self, net: SegmentationModel) -> list[nn.Module]:
        return [layer for module in net.modules() if isinstance(module, QVLoRA) for layer in module.low_rank_layers()]

    def first_trained_module(self, net: SegmentationModel) -> str | None:
        sites = net.attention_sites()  # in forward order: the encoder before the first one stays frozen
        return sites[0].name if sites else "image_encoder"
