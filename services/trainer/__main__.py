"""``python -m services.trainer``: TrainerService and AdapterRegistry (settings from SAMFORGE_* variables).

:func:`services.common.server.serve` runs the process: health answers NOT_SERVING while :func:`load` loads
the base model and resumes unfinished jobs, SERVING after. SIGTERM/SIGINT: NOT_SERVING, stop accepting,
drain in-flight calls for SAMFORGE_GRACE_SECONDS, then running jobs are interrupted (they stay resumable);
exit 0. A bad setting exits 2, a failed load 1. The service's own modules (torch, the job manager) are imported
only after the settings are read, so a bad setting fails at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from services.common.server import GrpcService, Loaded, exit_now, serve
from services.common.settings import TrainerSettings

log = logging.getLogger("samforge.trainer")


def services() -> Sequence[GrpcService]:
    from .servicer import REGISTRY, TRAINER

    return [TRAINER, REGISTRY]


def load(settings: TrainerSettings) -> Loaded:
    """The base model, the adapter store and the job manager (which resumes unfinished jobs)."""
    from sam_core.adapters.factory import open_store
    from sam_core.modeling.registry import load_model, resolve_device

    from .jobs import JobManager
    from .registry import TenantRegistry
    from .servicer import REGISTRY, TRAINER, AdapterRegistryService, TrainerService

    model = load_model(settings.model, settings.checkpoint or None, device=resolve_device(settings.device))
    store = open_store(settings.registry_url, settings.registry_dir, endpoint_url=settings.s3_endpoint_url)
    manager = JobManager(settings, model, store)
    log.info("model %s loaded (%s); jobs in %s", settings.model, model.model_id, manager.jobs_dir)

    def close() -> None:
        manager.shutdown(timeout=settings.grace_seconds)

    servicers = {TRAINER.name: TrainerService(manager), REGISTRY.name: AdapterRegistryService(TenantRegistry(store))}
    return Loaded(servicers, model.model_id, close)


def main() -> int:
    return serve("trainer", TrainerSettings.from_env, services, load)


if __name__ == "__main__":
    exit_now(main())
