"""Gradient checkpointing of the encoder blocks: the same losses and gradients as without it (tiny SAM 1 and SAM 2,
with and without the frozen-prefix cache, whose activations require no gradient; LiteMedSAM's TinyViT blocks),
and the blocks really recompute (each trained block runs twice in a training step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_core.adapters.artifact import adapted_net
from sam_core.data.dataset import load_dataset
from sam_core.data.splits import split_dataset
from sam_core.modeling.registry import load_model
from sam_core.training.config import TrainConfig
from sam_core.training.grad_checkpoint import checkpoint_encoder_blocks
from sam_core.training.loop import train
from sam_core.training.methods import MethodConfig


@pytest.fixture(scope="module")
def splits(blob_dataset_dir):
    return split_dataset(load_dataset(blob_dataset_dir), val_fraction=0.34, seed=0)


def _cfg(method: str, **kwargs) -> TrainConfig:
    base = {"method": MethodConfig(method), "epochs": 100, "max_steps": 3, "batch_size": 2, "lr": 2e-3,
            "warmup_steps": 1, "checkpoint_every": 100, "eval_every": 0, "seed": 1}
    return TrainConfig(**{**base, **kwargs})


@pytest.mark.parametrize(("model_name", "method", "prefix_cache"), [
    ("tiny", "lora", True), ("tiny", "lora", False), ("tiny", "full", False), ("tiny_sam2", "adapter", False)])
def test_loss_trajectory_with_checkpointing_equals_the_plain_one(model_name, method, prefix_cache, splits, tmp_path):
    model = load_model(model_name)
    runs = {flag: train(model, splits[0], None, _cfg(method, grad_checkpoint=flag, prefix_cache=prefix_cache),
                        tmp_path / str(flag)) for flag in (False, True)}
    np.testing.assert_allclose(runs[True].history["loss"], runs[False].history["loss"], rtol=0, atol=1e-6)
    assert len(runs[True].history["loss"]) == 3


def _encoder_gradients(net, images: torch.Tensor) -> dict[str, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    features = net.encode(images)
    sum(value.square().mean() for value in features.values()).backward()
    return {name: p.grad.clone() for name, p in net.named_parameters()
            if p.requires_grad and name.startswith("image_encoder.")}


@pytest.mark.parametrize("model_name", ["tiny", pytest.param("litemedsam", marks=pytest.mark.slow)])
def test_every_trained_encoder_tensor_gets_the_same_gradient(model_name, request):
    """From an input without gradient (as the frozen stem gives the first trained block), every trained tensor
    gets its gradient, equal to the plain one, and each trained block runs twice (forward and recomputation)."""
    model = request.getfixturevalue("litemedsam_model") if model_name == "litemedsam" else load_model(model_name)
    net = adapted_net(model, MethodConfig("lora"))
    images = torch.rand(1, 3, model.spec.img_size, model.spec.img_size, generator=torch.Generator().manual_seed(0))
    calls = [0]
    for block in net.encoder_blocks():  # count the blocks' real forward passes (recomputations included)
        def counted(*args, _forward=block.forward, **kwargs):
            calls[0] += 1
            return _forward(*args, **kwargs)

        block.forward = counted
    plain = _encoder_gradients(net, images)
    assert calls[0] == len(net.encoder_blocks()) > 0
    blocks, calls[0] = checkpoint_encoder_blocks(net), 0
    checkpointed = _encoder_gradients(net, images)
    # every block from the first trained one on runs again in the backward pass; before it nothing needs a gradient
    first = next(i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters()))
    assert calls[0] == len(blocks) + len(blocks) - first
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        calls[0] = 0
        net.encode(images)
    assert calls[0] == len(blocks)  # no recomputation without autograd
