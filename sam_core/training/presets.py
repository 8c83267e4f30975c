"""Hardware presets for training: one table (:data:`PRESETS`), chosen from what torch sees.

:class:`Machine` describes a machine (CUDA devices, CPU cores, the CPU's vector capability, native bf16 on the
CPU and on the GPU); :meth:`Machine.detect` reads it from torch and /proc. :func:`choose_preset` is a pure function
of a machine and an optional preset name: ``cpu`` without a CUDA device, ``gpu`` with one, ``multi-gpu`` with
several, and resolves the table's machine-dependent entries:

- ``bf16`` in the table means "bf16 autocast where the hardware computes bf16 natively": on a CPU only with
  AVX512-BF16 or AMX (:func:`~sam_core.modeling.encoder_opt.cpu_has_native_bf16`; emulated bf16 is slower than
  fp32), on a GPU when torch reports bf16 support;
- ``processes`` 0 means one DDP process per CUDA device (launched by ``torchrun``); ``batch_size`` is per
  process, so the global batch is ``batch_size x processes``;
- ``threads`` 0 means the CPU cores divided over the processes.

:func:`override` applies explicit choices (``samforge train --batch-size`` etc.) over a preset, so an explicit
flag always wins. A preset has no DataLoader worker count (the training data is read in the training process)
and turns gradient checkpointing of the encoder blocks on for the GPU presets, where the activations of an
encoder-side step bind memory (:mod:`sam_core.training.grad_checkpoint`, non-reentrant: TinyViT's own reentrant
``use_checkpoint`` gives a stage's parameters no gradient when its input requires none, as the frozen-prefix
cache's activations do; measured: 9 of 41 tensors of LiteMedSAM's second stage got one). On a CPU memory does not
bind and the recomputation would only cost time.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from sam_core.errors import InvalidInput


@dataclass(frozen=True)
class Machine:
    """What a preset is chosen from."""

    cuda_devices: int
    cpu_cores: int
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", ...
    cpu_bf16: bool  # the CPU computes bf16 natively
    gpu_bf16: bool = False

    @staticmethod
    def detect() -> Machine:
        import torch

        from sam_core.modeling.encoder_opt import cpu_has_native_bf16

        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return Machine(cuda_devices=cuda, cpu_cores=len(os.sched_getaffinity(0)),
                       cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_bf16=cpu_has_native_bf16(),
                       gpu_bf16=bool(cuda) and torch.cuda.is_bf16_supported())

    def describe(self) -> str:
        bf16 = "native bf16" if self.cpu_bf16 else "no native bf16"
        return f"{self.cuda_devices} CUDA devices, {self.cpu_cores} CPU cores ({self.cpu_capability}, {bf16})"


@dataclass(frozen=True)
class Preset:
    """How to train on a machine (see the module docstring for the table's 0 / bf16 conventions)."""

    name: str
    batch_size: int  # per process
    bf16: bool
    threads: int
    processes: int
    grad_checkpoint: bool = False  # recompute encoder block activations in the backward pass (encoder methods)

    @property
    def ddp(self) -> bool:
        return self.processes > 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes

    def describe(self) -> str:
        ranks = f"DDP over {self.processes} processes" if self.ddp else "1 process, no DDP"
        checkpointing = ", gradient checkpointing" if self.grad_checkpoint else ""
        return (f"preset {self.name}: batch {self.global_batch}, {'bf16 autocast' if self.bf16 else 'fp32'}, "
                f"{self.threads} thread{'' if self.threads == 1 else 's'}, {ranks}{checkpointing}")


PRESETS: dict[str, Preset] = {
    # batch 4: the CPU fits one LiteMedSAM encoder-side step of 4 images in a few GB, and a step takes seconds
    "cpu": Preset("cpu", batch_size=4, bf16=True, threads=0, processes=1),
    # batch 8 per GPU: MedSAM's recipe
    "gpu": Preset("gpu", batch_size=8, bf16=True, threads=0, processes=1, grad_checkpoint=True),
    "multi-gpu": Preset("multi-gpu", batch_size=8, bf16=True, threads=0, processes=0, grad_checkpoint=True),
}


def default_preset_name(machine: Machine) -> str:
    if machine.cuda_devices > 1:
        return "multi-gpu"
    return "gpu" if machine.cuda_devices == 1 else "cpu"


def choose_preset(machine: Machine, name: str | None = None) -> Preset:
    """The preset ``name`` (default: the one for ``machine``) resolved for ``machine``; a GPU preset on a machine
    without CUDA devices is InvalidInput(field="preset")."""
    name = name or default_preset_name(machine)
    if name not in PRESETS:
        raise InvalidInput(f"must be one of {', '.join(PRESETS)}, got {name!r}", field="preset")
    row = PRESETS[name]
    on_gpu = name != "cpu"
    if on_gpu and machine.cuda_devices < 1:
        raise InvalidInput(f"preset {name} needs a CUDA device; torch sees none", field="preset")
    processes = row.processes or max(1, machine.cuda_devices)
    native_bf16 = machine.gpu_bf16 if on_gpu else machine.cpu_bf16
    return dataclasses.replace(row, bf16=row.bf16 and native_bf16, processes=processes,
                               threads=row.threads or max(1, machine.cpu_cores // processes))


def override(preset: Preset, *, batch_size: int | None = None, bf16: bool | None = None,
             threads: int | None = None, grad_checkpoint: bool | None = None) -> Preset:
    """``preset`` with every explicitly given (not None) value replacing its own; ``batch_size`` is global."""
    changed = dataclasses.replace(
        preset, bf16=preset.bf16 if bf16 is None else bf16, threads=preset.threads if threads is None else threads,
        grad_checkpoint=preset.grad_checkpoint if grad_checkpoint is None else grad_checkpoint)
    if batch_size is None:
        return changed
    if batch_size < 1 or batch_size % preset.processes:
        raise InvalidInput(f"must be >= 1 and divisible by the {preset.processes} processes, got {batch_size}",
                           field="batch_size")
    return dataclasses.replace(changed, batch_size=batch_size // preset.processes)

