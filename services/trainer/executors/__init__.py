"""Job executors, chosen by ``SAMFORGE_TRAINER_EXECUTOR`` (:data:`EXECUTORS`; the contract: :mod:`.base`).

- ``process`` (default, :mod:`.process`): each job attempt is its own ``samforge train`` worker process
  (torchrun for several processes per node).
- ``inline`` (:mod:`.inline`): a thread of the trainer; for the JobManager's mechanics tests.
- ``kubernetes`` (:mod:`.kubernetes`): a batch/v1 Indexed Job running the same worker command under torchrun
  (rendered and called by :mod:`services.trainer.k8s_job`, with the pod's service account).
"""

from __future__ import annotations

from collections.abc import Callable

from sam_core.modeling.registry import LoadedModel
from services.common.settings import TrainerSettings

from ..k8s_job import KubernetesExecutor
from .base import Executor, JobControl, JobLaunch, Outcome, RunResult
from .inline import InlineExecutor
from .kubernetes import KubernetesJobExecutor
from .process import ProcessExecutor

ExecutorFactory = Callable[[TrainerSettings, LoadedModel], Executor]

EXECUTORS: dict[str, ExecutorFactory] = {
    "process": lambda settings, model: ProcessExecutor(settings),
    "inline": lambda settings, model: InlineExecutor(model),
    "kubernetes": lambda settings, model: KubernetesJobExecutor(settings, KubernetesExecutor.in_cluster(settings)),
}


def make_executor(settings: TrainerSettings, model: LoadedModel) -> Executor:
    """The executor ``settings.executor`` names (the setting's parser has already checked the name)."""
    return EXECUTORS[settings.executor](settings, model)


__all__ = ["EXECUTORS", "Executor", "JobControl", "JobLaunch", "Outcome", "RunResult", "make_executor"]
