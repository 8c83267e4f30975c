"""Subprocess entry for training tests: a real kill mid-run, and torchrun with 2 gloo ranks.

usage: python train_worker.py DATA OUT METHOD MAX_STEPS BATCH [KILL_AT_STEP]
Writes OUT/final.safetensors (rank 0) with the trainable tensors after the run.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sam_core.data.dataset import load_dataset
from sam_core.data.splits import split_dataset
from sam_core.modeling.registry import load_model
from sam_core.training.checkpoint import latest_checkpoint, load_checkpoint
from sam_core.training.config import TrainConfig
from sam_core.training.loop import train
from sam_core.training.methods import MethodConfig


def config(method: str, max_steps: int, batch: int) -> TrainConfig:
    return TrainConfig(method=MethodConfig(method), epochs=100, max_steps=max_steps, batch_size=batch, lr=1e-3,
                       warmup_steps=2, checkpoint_every=2, eval_every=3, seed=3)


def main() -> None:
    data, out, method, max_steps, batch = sys.argv[1:6]
    kill_at = int(sys.argv[6]) if len(sys.argv) > 6 else None
    torch.set_num_threads(1)
    train_ds, val_ds = split_dataset(load_dataset(data), val_fraction=0.34, seed=0)

    def callback(event) -> None:
        if kill_at is not None and event.state == "training" and event.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no exception handlers

    result = train(load_model("tiny"), train_ds, val_ds, config(method, int(max_steps), int(batch)), out,
                   callback=callback)
    if result.model is not None:  # rank 0: the trainable tensors after the last step
        final = load_checkpoint(latest_checkpoint(Path(out)))["trainable"]
        assert final and result.steps == int(max_steps)
        save_file(final, os.path.join(out, "final.safetensors"))


if __name__ == "__main__":
    main()
