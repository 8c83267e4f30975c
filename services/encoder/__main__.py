"""``python -m services.encoder``: the encoder service (settings from SAMFORGE_* environment variables).

The server starts first and answers health with NOT_SERVING while the weights load; it turns SERVING once
the engine is ready. SIGTERM/SIGINT: NOT_SERVING, stop accepting, drain in-flight calls for
SAMFORGE_GRACE_SECONDS, then stop the batcher, the registry watch and the Redis client; exit 0.
"""

from __future__ import annotations

import logging

import torch

from sam_core.errors import SamforgeError
from services.common import compute
from services.common.server import build_server, exit_now, run_until_signal, setup_logging
from services.common.settings import EncoderSettings

from .engine import build_engine
from .servicer import EncoderService, register

log = logging.getLogger("samforge.encoder")


def main() -> int:
    settings = EncoderSettings.from_env()
    setup_logging(settings.log_level)
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    service = EncoderService()
    server = build_server(settings, register(service))
    try:
        engine = compute.shared().run(build_engine, settings)  # one OpenMP team: see compute
    except SamforgeError as exc:
        log.error("cannot start the encoder: %s", exc)
        server.stop(0)
        return 1
    service.attach(engine)
    server.set_serving(True)
    log.info("SERVING %s on port %d", engine.model_id, server.port)
    run_until_signal(server, on_stop=engine.close)
    return 0


if __name__ == "__main__":
    exit_now(main())
