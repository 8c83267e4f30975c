"""Which GPUs each rank of a job trains on, and the per-rank launcher that applies it (CUDA_VISIBLE_DEVICES).

A job asking for ``gpus_per_process`` G > 0 with P processes per node owns P x G devices of its node:

- process executor: the first P x G of the trainer's visible devices (its CUDA_VISIBLE_DEVICES, else every
  device torch sees), given to the worker as its CUDA_VISIBLE_DEVICES (:func:`job_devices`). Jobs running at
  the same time (SAMFORGE_MAX_CONCURRENT_JOBS > 1) would share them: GPU jobs want one job at a time.
- kubernetes executor: the pod's ``nvidia.com/gpu`` limit of P x G already isolates them from the node's
  other GPUs; the container sees exactly those, numbered 0 .. P x G - 1 (CUDA_VISIBLE_DEVICES unset).

Local rank r then owns devices r x G .. r x G + G - 1 of the job's (:func:`rank_devices`). Every rank runs
through ``python -m services.trainer.devices --gpus-per-process G -- samforge train ... --device
cuda:0`` (:func:`rank_launcher`): it sets CUDA_VISIBLE_DEVICES to the rank's own devices and execs the
command, so a rank sees only its G devices and trains on the first of them (the training loop uses one
device per process; G > 1 reserves the others for it). A job with G = 0 is left as it was: it runs on the
trainer's SAMFORGE_DEVICE (``auto``: ``cuda:<LOCAL_RANK>`` when CUDA is there, else the CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from sam_core.errors import InvalidInput

ENV = "CUDA_VISIBLE_DEVICES"
RANK_DEVICE = "cuda:0"  # the first of the rank's own devices, once CUDA_VISIBLE_DEVICES holds only them
MODULE = "services.trainer.devices"


def visible_devices(value: str | None, count: int) -> list[str]:
    """The devices a process may use: the entries of CUDA_VISIBLE_DEVICES (``value``), or 0 .. count - 1
    when it is unset."""
    if value is None:
        return [str(index) for index in range(count)]
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def rank_devices(local_rank: int, gpus_per_process: int, visible: Sequence[str]) -> list[str]:
    """The ``gpus_per_process`` devices of local rank ``local_rank`` among the job's ``visible`` devices."""
    first = local_rank * gpus_per_process
    if local_rank < 0 or first + gpus_per_process > len(visible):
        raise InvalidInput(f"local rank {local_rank} needs devices {first}..{first + gpus_per_process - 1}, "
                           f"only {len(visible)} visible ({','.join(visible) or 'none'})",
                           field="resources.gpus_per_process")
    return list(visible[first:first + gpus_per_process])


def job_devices(processes: int, gpus_per_process: int, visible: Sequence[str]) -> list[str]:
    """The devices of a job of ``processes`` ranks on this node: the first processes x gpus_per_process."""
    return [device for rank in range(processes) for device in rank_devices(rank, gpus_per_process, visible)]


def rank_launcher(gpus_per_process: int, python: str = "python") -> list[str]:
    """The per-rank prefix of a job's training command (nothing for a job without GPUs)."""
    if gpus_per_process <= 0:
        return []
    return [python, "-m", MODULE, f"--gpus-per-process={gpus_per_process}", "--"]


def rank_environment(environ: Mapping[str, str], gpus_per_process: int) -> dict[str, str]:
    """``environ`` with CUDA_VISIBLE_DEVICES narrowed to this rank's devices (torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE; outside torchrun: rank 0 of 1)."""
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    processes = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    visible = visible_devices(environ.get(ENV), processes * gpus_per_process)
    return {**environ, ENV: ",".join(rank_devices(local_rank, gpus_per_process, visible))}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command after ``--`` on this rank's devices (exec: it becomes this process)."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=main.__doc__)
    parser.add_argument("--gpus-per-process", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.gpus_per_process < 1:
        parser.error("usage: --gpus-per-process G (>= 1) -- COMMAND ...")
    environment = rank_environment(os.environ, args.gpus_per_process)
    os.execvpe(command[0], command, environment)  # nosec B606  # the job's own training command


if __name__ == "__main__":
    raise SystemExit(main())
