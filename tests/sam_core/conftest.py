"""Fixtures shared by the sam_core tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sam_core import files
from sam_core.adapters.artifact import adapted_net, save_adapter
from sam_core.training.methods import MethodConfig, trainable_state


@pytest.fixture()
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path behind every descriptor passed to os.fsync (then fsync it for real)."""
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    return calls


@pytest.fixture()
def make_artifact(tiny_model, tmp_path):
    """make_artifact(seed) -> a fresh decoder artifact folder whose tensors depend on ``seed``."""
    cfg = MethodConfig("decoder")
    counter = iter(range(1000))

    def make(seed: int = 0) -> Path:
        sam = adapted_net(tiny_model, cfg)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            param = next(p for p in sam.mask_decoder.parameters() if p.requires_grad)
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        out = tmp_path / "artifacts" / f"a{next(counter)}"
        save_adapter(out, tiny_model, trainable_state(sam), cfg, metrics={"val_dice": 0.5 + seed / 100})
        return out

    return make
