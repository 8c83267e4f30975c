"""Fine-tuning methods: what each one injects into a ``Sam`` and which tensors it trains.

Every method is a small object with ``prepare(sam, cfg)`` — inject modules (LoRA, adapters) and set
``requires_grad`` — after which the trainable tensors are exactly ``trainable_state(sam)``, the
tensors an adapter artifact stores. The prompt encoder is always frozen (as in MedSAM).

- ``decoder``: mask decoder only; the encoder is frozen so training runs on cached embeddings.
- ``lora``: SAMed-style LoRA on the query and value projections of every image-encoder attention
  (rank 4 by default) plus the mask decoder. SAM and TinyViT fuse q, k, v into one ``qkv`` Linear,
  so peft's LoRA (which adapts whole Linear outputs, i.e. q, k *and* v) does not express SAMed's
  q/v-only update; :class:`QVLoRA` adds two low-rank updates into the q and v output channels.
- ``adapter``: SAM-Adapter / Medical-SAM-Adapter bottleneck MLPs (dim -> dim*ratio -> dim, GELU,
  zero-initialised up-projection so training starts at the base model) on every encoder block's
  attention output, plus the mask decoder.
- ``full``: image encoder and mask decoder (MedSAM style).
- ``persam``: one-shot PerSAM-F; trains no Sam weights (see :mod:`sam_core.training.persam`).

Encoder BatchNorm layers (TinyViT) keep their running statistics frozen during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sam_core.errors import InvalidInput

METHODS = ("decoder", "lora", "adapter", "full", "persam")
ENCODER_METHODS = ("lora", "adapter", "full")


@dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters that change the artifact's tensors (stored in adapter_config.json)."""

    method: str = "decoder"
    rank: int = 4
    alpha: float = 4.0
    adapter_ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInput(f"unknown method {self.method!r}; one of {', '.join(METHODS)}", field="method")
        if self.rank < 1:
            raise InvalidInput(f"rank must be >= 1, got {self.rank}", field="rank")
        if not 0 < self.adapter_ratio <= 4:
            raise InvalidInput(f"adapter_ratio must be in (0, 4], got {self.adapter_ratio}", field="adapter_ratio")

    @property
    def encoder_side(self) -> bool:
        """True when the method changes the image encoder (so embeddings differ from the base model's)."""
        return self.method in ENCODER_METHODS


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        dq = self.lora_B_q(self.lora_A_q(x)) * self.scale
        dv = self.lora_B_v(self.lora_A_v(x)) * self.scale
        return out.index_add(-1, self.q_idx, dq).index_add(-1, self.v_idx, dv)


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
        return self.up(self.act(self.down(x)))


class AttentionWithAdapter(nn.Module):
    """attn(x) followed by a residual bottleneck adapter: y = a + adapter(a), a = attn(x)."""

    def __init__(self, attn: nn.Module, dim: int, hidden: int) -> None:
        super().__init__()
        self.attn = attn
        self.adapter = Bottleneck(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(x)
        return a + self.adapter(a)


def encoder_attentions(encoder: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, block, block.attn) for every transformer block in a SAM ViT or TinyViT encoder."""
    found = []
    for name, module in encoder.named_modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, nn.Module) and isinstance(getattr(attn, "qkv", None), nn.Linear):
            found.append((name, module, attn))
    return found


def qv_channels(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Output channels of ``attn.qkv`` that hold q and v, for SAM ViT and TinyViT layouts."""
    out = attn.qkv.out_features
    if hasattr(attn, "key_dim") and hasattr(attn, "d"):  # TinyViT: per head [q(kd) | k(kd) | v(d)]
        kd, d, heads = attn.key_dim, attn.d, attn.num_heads
        per_head = 2 * kd + d
        q = torch.cat([torch.arange(h * per_head, h * per_head + kd) for h in range(heads)])
        v = torch.cat([torch.arange(h * per_head + 2 * kd, (h + 1) * per_head) for h in range(heads)])
        return q, v
    dim = out // 3  # SAM ViT: [q (all heads) | k | v]
    return torch.arange(0, dim), torch.arange(2 * dim, 3 * dim)


def _attn_dim(attn: nn.Module) -> int:
    proj = getattr(attn, "proj", None)
    return proj.out_features if isinstance(proj, nn.Linear) else attn.qkv.in_features


def inject(sam: nn.Module, cfg: MethodConfig) -> None:
    """Add the method's modules to ``sam`` in place (no-op for decoder/full/persam)."""
    if cfg.method == "lora":
        for _, _, attn in encoder_attentions(sam.image_encoder):
            if isinstance(attn.qkv, QVLoRA):
                raise InvalidInput("model already has LoRA layers", field="method")
            q, v = qv_channels(attn)
            attn.qkv = QVLoRA(attn.qkv, q, v, cfg.rank, cfg.alpha)
    elif cfg.method == "adapter":
        for _, block, attn in encoder_attentions(sam.image_encoder):
            dim = _attn_dim(attn)
            block.attn = AttentionWithAdapter(attn, dim, max(1, int(dim * cfg.adapter_ratio)))


def set_trainable(sam: nn.Module, cfg: MethodConfig) -> None:
    """requires_grad per method (after :func:`inject`)."""
    sam.requires_grad_(False)
    if cfg.method == "persam":
        return
    sam.mask_decoder.requires_grad_(True)
    if cfg.method == "full":
        sam.image_encoder.requires_grad_(True)
    for name, param in sam.image_encoder.named_parameters():
        if ".lora_" in name or ".adapter." in name:
            param.requires_grad_(True)


def prepare(sam: nn.Module, cfg: MethodConfig) -> None:
    inject(sam, cfg)
    set_trainable(sam, cfg)


def trainable_state(sam: nn.Module) -> dict[str, torch.Tensor]:
    """name -> detached CPU tensor for every parameter with requires_grad (what an artifact stores)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in sam.named_parameters() if p.requires_grad}


def trainable_names(sam: nn.Module) -> set[str]:
    return {n for n, p in sam.named_parameters() if p.requires_grad}


def train_mode(sam: nn.Module) -> None:
    """Train mode for the trainable parts; BatchNorm statistics and frozen modules stay in eval mode."""
    sam.eval()
    for module in (sam.mask_decoder, sam.image_encoder):
        if any(p.requires_grad for p in module.parameters()):
            module.train()
    for module in sam.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
