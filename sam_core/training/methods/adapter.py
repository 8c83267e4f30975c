"""``adapter``: SAM-Adapter / Medical-SAM-Adapter bottleneck MLPs (dim -> dim * ratio -> dim, GELU,
zero-initialised up-projection so training starts at the base model) on every image-encoder attention's
output, plus the mask decoder."""

from __future__ import annotations

import torch
from torch import nn

from sam_core.modeling.family import SegmentationModel
from sam_core.training.methods.base import FineTuningMethod, MethodConfig


class Bottleneck(nn.Module):
    """dim -> hidden -> dim MLP with GELU; the up-projection starts at zero (identity residual)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.up(self.act(self.down(x)))
        return out


class AttentionWithAdapter(nn.Module):
    """attn(x) followed by a residual bottleneck adapter: y = a + adapter(a), a = attn(x)."""

    def __init__(self, attn: nn.Module, dim: int, hidden: int) -> None:
        super().__init__()
        self.attn = attn
        self.adapter = Bottleneck(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a: torch.Tensor = self.attn(x)
        adapted: torch.Tensor = a + self.adapter(a)
        return adapted


class AdapterMethod(FineTuningMethod):
    name = "adapter"
    summary = "bottleneck adapters after every encoder attention + mask decoder (SAM-Adapter)"
    recommended_lr = 3e-4
    changes_image_encoder = True

    def inject(self, net: SegmentationModel, cfg: MethodConfig) -> None:
        for site in net.attention_sites():
            hidden = max(1, int(site.dim * cfg.adapter_ratio))
            setattr(site.owner, site.attr, AttentionWithAdapter(site.attn, site.dim, hidden))

    def injected_modules(self, net: SegmentationModel) -> list[nn.Module]:
        return [module.adapter for module in net.modules() if isinstance(module, AttentionWithAdapter)]

    def first_trained_module(self, net: SegmentationModel) -> str | None:
        sites = net.attention_sites()  # in forward order: the encoder before the first one stays frozen
        return sites[0].name if sites else "image_encoder"
