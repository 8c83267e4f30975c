"""Training checkpoints: ``<out>/checkpoints/step_<N>.pt`` holding the config, step, trainable tensors,
optimizer state, history and best-so-far weights; written atomically (temp file, fsync, ``os.replace``), the
last ``keep`` kept, read with ``torch.load(weights_only=True)`` (never unpickling arbitrary objects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sam_core.files import atomic_output

CHECKPOINT_FORMAT = 1


def _checkpoint_path(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}.pt"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def save_checkpoint(out: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of its step (atomically), then delete all but the newest ``keep``."""
    path = _checkpoint_path(out, state["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    for old in sorted(path.parent.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state
