"""Protobuf <-> plain types for the trainer and registry servicers (the only module that knows both)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sam_core.adapters.store import AdapterVersion
from sam_core.training.guard import SIGNATURE_METRIC
from services._generated.sam.v1 import trainer_pb2

from .job_model import Job, JobEvent, JobState, numeric_metrics
from .job_spec import Hyperparameters, JobRequest, Resources
from .uploads import Chunk

_STATE_TO_PB = {
    JobState.QUEUED: trainer_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: trainer_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: trainer_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: trainer_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: trainer_pb2.JOB_STATE_CANCELLED,
    JobState.REJECTED: trainer_pb2.JOB_STATE_REJECTED,
}
_HP_FIELDS = ("epochs", "max_steps", "batch_size", "lr", "rank", "prompt", "val_fraction", "seed", "bf16",
              "patience", "crop", "warmup_steps", "checkpoint_every", "time_budget_seconds")


def job_request(msg: trainer_pb2.CreateJobRequest) -> JobRequest:
    hp = Hyperparameters(**{name: getattr(msg.hyperparameters, name) for name in _HP_FIELDS})
    res = msg.resources
    resources = Resources(nodes=res.nodes, processes_per_node=res.processes_per_node,
                          gpus_per_process=res.gpus_per_process)
    return JobRequest(tenant=msg.tenant, dataset=msg.dataset, method=msg.method, adapter_name=msg.adapter_name,
                      hyperparameters=hp, promote_to=msg.promote_to, resources=resources,
                      allow_regression=msg.allow_regression, min_improvement=msg.min_improvement)


def job_pb(job: Job) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        id=job.id, tenant=job.tenant, state=_STATE_TO_PB[job.state], method=job.method, dataset=job.dataset,
        adapter_name=job.adapter_name, adapter_version=job.adapter_version, step=job.step,
        total_steps=job.total_steps, created_at=job.created_at, error=job.error, metrics=job.metrics,
        resources=trainer_pb2.Resources(**job.request.resources.to_json()), resumes=job.resumes,
    )


def event_pb(event: JobEvent) -> trainer_pb2.JobEvent:
    return trainer_pb2.JobEvent(
        job=job_pb(event.job), phase=event.phase, loss=event.loss or 0.0, val_dice=event.val_dice or 0.0,
        best_val_dice=event.best_val_dice or 0.0, eta_seconds=event.eta_seconds or 0.0, message=event.message,
    )


def chunks(messages: Iterable[trainer_pb2.DatasetChunk]) -> Iterator[Chunk]:
    for msg in messages:
        yield Chunk(tenant=msg.tenant, filename=msg.filename, data=msg.data)


def adapter_pb(version: AdapterVersion) -> trainer_pb2.Adapter:
    return trainer_pb2.Adapter(
        tenant=version.tenant, name=version.name, version=version.version, sha256=version.sha256,
        method=version.method, base_model_id=version.base_model_id,
        shares_base_embeddings=version.shares_base_embeddings, aliases=list(version.aliases),
        metrics=numeric_metrics(version.metrics), created_at=version.created_at, parent=version.parent or "",
        n_parameters=version.n_parameters, heldout_signature=str(version.metrics.get(SIGNATURE_METRIC) or ""),
    )
