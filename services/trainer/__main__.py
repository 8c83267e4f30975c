"""``python -m services.trainer``: load the base model, resume unfinished jobs, serve TrainerService and
AdapterRegistry until SIGTERM (running jobs are then interrupted and stay resumable)."""

from __future__ import annotations

import logging

from sam_core.errors import SamforgeError
from services.common.server import build_server, exit_now, run_until_signal, setup_logging
from services.common.settings import TrainerSettings

log = logging.getLogger("samforge.trainer")


def main() -> int:
    try:
        settings = TrainerSettings.from_env()
    except SamforgeError as exc:
        setup_logging("INFO")
        log.error("bad configuration: %s", exc)
        return 2
    setup_logging(settings.log_level)
    import torch

    from sam_core.adapters.filesystem import FileSystemAdapterStore
    from sam_core.modeling.registry import load_model, resolve_device

    from .jobs import JobManager
    from .registry import TenantRegistry
    from .servicer import register

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    try:
        model = load_model(settings.model, settings.checkpoint or None, device=resolve_device(settings.device))
        store = FileSystemAdapterStore(settings.registry_dir)
        manager = JobManager(settings, model, store)
    except SamforgeError as exc:
        log.error("cannot start: %s", exc)
        return 2
    log.info("model %s loaded (%s); jobs in %s", settings.model, model.model_id, manager.jobs_dir)
    server = build_server(settings, lambda grpc_server: register(grpc_server, manager, TenantRegistry(store)))
    server.set_serving(True)
    run_until_signal(server, on_stop=lambda: manager.shutdown(timeout=settings.grace_seconds))
    return 0


if __name__ == "__main__":
    exit_now(main())
