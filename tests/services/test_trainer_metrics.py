"""The trainer's /metrics in process: aggregates only by default; per-job gauges (job=<id>) only when the
operator opts in with SAMFORGE_METRICS_JOB_LABELS=true."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from sam_core.adapters.filesystem import FileSystemAdapterStore
from services.common.settings import TrainerSettings
from services.trainer.job_spec import Hyperparameters, JobRequest
from services.trainer.jobs import JobManager
from tests.conftest import write_blob_dataset

LONG = Hyperparameters(epochs=500, batch_size=2, lr=1e-3)


def _manager(tmp_path, model, **env: str) -> JobManager:
    write_blob_dataset(tmp_path / "data" / "default" / "blobs")
    settings = TrainerSettings.from_env({"SAMFORGE_DATA_DIR": str(tmp_path / "data"),
                                         "SAMFORGE_JOBS_DIR": str(tmp_path / "jobs"),
                                         "SAMFORGE_REGISTRY_DIR": str(tmp_path / "registry"),
                                         "SAMFORGE_TRAINER_EXECUTOR": "inline", **env})
    return JobManager(settings, model, FileSystemAdapterStore(tmp_path / "registry"))


def _job_gauges_while_training(manager: JobManager) -> tuple[float | None, float | None]:
    """(samforge_training_step{job=<id>}, samforge_training_steps_total) once a job has trained 2 steps."""
    job = manager.create(JobRequest(tenant="", dataset="blobs", method="decoder", adapter_name="m",
                                    hyperparameters=LONG))
    steps_before = REGISTRY.get_sample_value("samforge_training_steps_total") or 0.0
    try:
        next(e for e in manager.watch("", job.id) if e.phase == "training" and e.job.step >= 2)
        per_job = REGISTRY.get_sample_value("samforge_training_step", {"job": job.id})
        steps = (REGISTRY.get_sample_value("samforge_training_steps_total") or 0.0) - steps_before
    finally:
        manager.cancel("", job.id)
        manager.shutdown(timeout=30)
    assert REGISTRY.get_sample_value("samforge_training_step", {"job": job.id}) is None  # gone once it ended
    return per_job, steps


@pytest.mark.parametrize(("env", "labelled"), [({}, False), ({"SAMFORGE_METRICS_JOB_LABELS": "true"}, True)])
def test_per_job_gauges_only_when_the_operator_opts_in(tmp_path, tiny_model, env, labelled):
    per_job, steps = _job_gauges_while_training(_manager(tmp_path, tiny_model, **env))
    assert (per_job is not None) is labelled
    assert steps is not None and steps >= 2
