"""``python -m services.trainer``: TrainerService and AdapterRegistry (settings from SAMFORGE_* variables).

:func:`services.common.server.serve` runs the process: health answers NOT_SERVING while :func:`load` loads
the base model and resumes unfinished jobs, SERVING after. SIGTERM/SIGINT: NOT_SERVING, stop accepting,
drain in-flight calls for SAMFORGE_GRACE_SECONDS, then running jobs are interrupted (they stay resumable);
exit 0. A bad setting exits 2, a failed load 1.
"""

from __future__ import annotations

import logging

from sam_core.adapters.factory import open_store
from sam_core.modeling.registry import load_model, resolve_device
from services.common.server import Loaded, exit_now, serve
from services.common.settings import TrainerSettings

from .jobs import JobManager
from .registry import TenantRegistry
from .servicer import REGISTRY, TRAINER, AdapterRegistryService, TrainerService

log = logging.getLogger("samforge.trainer")


def load(settings: TrainerSettings) -> Loaded:
    """The base model, the adapter store and the job manager (which resumes unfinished jobs)."""
    model = load_model(settings.model, settings.checkpoint or None, device=resolve_device(settings.device))
    store = open_store(settings.registry_url, settings.registry_dir, endpoint_url=settings.s3_endpoint_url)
    manager = JobManager(settings, model, store)
    log.info("model %s loaded (%s); jobs in %s", settings.model, model.model_id, manager.jobs_dir)

    def close() -> None:
        manager.shutdown(timeout=settings.grace_seconds)

    servicers = {TRAINER.name: TrainerService(manager), REGISTRY.name: AdapterRegistryService(TenantRegistry(store))}
    return Loaded(servicers, model.model_id, close)


def main() -> int:
    return serve("trainer", TrainerSettings.from_env, [TRAINER, REGISTRY], load)


if __name__ == "__main__":
    exit_now(main())
