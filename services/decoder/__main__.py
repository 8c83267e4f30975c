"""``python -m services.decoder``: the decoder service (settings from SAMFORGE_* environment variables).

The server starts first and answers health with NOT_SERVING while the weights load and the base decoder
graph is exported (or found in ``SAMFORGE_ONNX_CACHE_DIR``); it turns SERVING once the engine is ready. The
encoder channel is lazy: the decoder starts (and serves cached embeddings) while the encoder is down.
SIGTERM/SIGINT: NOT_SERVING, stop accepting, drain in-flight calls for SAMFORGE_GRACE_SECONDS, then stop the
registry watch and close the encoder channel; exit 0.
"""

from __future__ import annotations

import logging

import torch

from sam_core.errors import SamforgeError
from services.common import compute
from services.common.server import build_server, exit_now, run_until_signal, setup_logging
from services.common.settings import DecoderSettings

from .encoder_client import EncoderClient, open_channel
from .engine import build_engine
from .servicer import DecoderService, register

log = logging.getLogger("samforge.decoder")


def main() -> int:
    try:
        settings = DecoderSettings.from_env()
    except SamforgeError as exc:
        setup_logging("INFO")
        log.error("bad configuration: %s", exc)
        return 2
    setup_logging(settings.log_level)
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    service = DecoderService()
    server = build_server(settings, register(service))
    client = EncoderClient(open_channel(settings), settings.encoder_timeout_seconds, address=settings.encoder_address)
    try:
        engine = compute.shared().run(build_engine, settings, client)  # one OpenMP team: see compute
    except SamforgeError as exc:
        log.error("cannot start the decoder: %s", exc)
        client.close()
        server.stop(0)
        return 1
    service.attach(engine)
    server.set_serving(True)
    log.info("SERVING %s on port %d (runtime %s, encoder %s)", engine.model_id, server.port, engine.runtime.name,
             settings.encoder_address)
    run_until_signal(server, on_stop=engine.close)
    return 0


if __name__ == "__main__":
    exit_now(main())
