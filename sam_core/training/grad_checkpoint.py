"""Gradient checkpointing of the image encoder's blocks (``TrainConfig.grad_checkpoint``, the GPU presets).

An encoder-side method (lora, adapter, full) keeps every encoder block's activations for the backward pass;
at SAM's 1024 px input that, not the parameters, is what fills a GPU. With checkpointing a block keeps only its
input and recomputes its activations during the backward pass: less memory for one more forward pass of the
blocks. The losses and gradients are those of the uncheckpointed step (tested).

Non-reentrant (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``): a block's parameters get their
gradients even when the block's input requires none, which is always the case for the first trained block
(the frozen-prefix cache's activations, or a frozen stem). Reentrant checkpointing, which TinyViT's own
``use_checkpoint`` switch uses, silently gives such a block no gradient. Blocks are checkpointed only while
autograd records (training steps); validation, inference and the no-grad prefix run them as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sam_core.modeling.family import SegmentationModel


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def checkpoint_encoder_blocks(net: SegmentationModel) -> list[nn.Module]:
    """Make every block of ``net.encoder_blocks()`` recompute its activations in the backward pass (in place);
    returns the blocks."""
    blocks = net.encoder_blocks()
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    return blocks
