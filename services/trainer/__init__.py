"""Trainer service: fine-tuning jobs (queue, progress stream, cancel, crash recovery), data set uploads and the
adapter registry API, over ``sam_core.training.finetune.run_finetune`` and ``sam_core.adapters.store``.

Modules: ``job_spec`` (request validation -> FinetuneSpec), ``job_model`` (Job / JobEvent, job.json),
``jobs`` (JobManager), ``uploads`` (archive upload + safe extraction), ``registry`` (tenant-scoped registry
calls), ``convert`` (protobuf <-> plain types), ``servicer`` (the two gRPC servicers), ``__main__``.
"""
