"""``python -m services.decoder``: the decoder service (settings from SAMFORGE_* environment variables).

:func:`services.common.server.serve` runs the process: health answers NOT_SERVING while :func:`load` loads
the weights and exports the base decoder graph (or finds it in ``SAMFORGE_ONNX_CACHE_DIR``), SERVING after.
The encoder channel is lazy: the decoder starts (and serves cached embeddings) while the encoder is down.
SIGTERM/SIGINT: NOT_SERVING, stop accepting, drain in-flight calls for SAMFORGE_GRACE_SECONDS, then the
engine closes (registry watch, encoder channel); exit 0. A bad setting exits 2, a failed load 1. The service's
own modules (torch, the engine) are imported only after the settings are read, so a bad setting fails at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.server import GrpcService, Loaded, exit_now, serve
from services.common.settings import DecoderSettings


def services() -> Sequence[GrpcService]:
    from .servicer import SERVICE

    return [SERVICE]


def load(settings: DecoderSettings) -> Loaded:
    """The engine over a channel to the encoder, built on the process's compute thread (one OpenMP team)."""
    from services.common import compute

    from .encoder_client import EncoderClient, open_channel
    from .engine import build_engine
    from .servicer import SERVICE, DecoderService

    client = EncoderClient(open_channel(settings), settings.encoder_timeout_seconds, address=settings.encoder_address)
    try:
        engine = compute.shared().run(build_engine, settings, client)
    except BaseException:
        client.close()
        raise
    return Loaded({SERVICE.name: DecoderService(engine)}, f"{engine.model_id}, {engine.runtime.name} runtime",
                  engine.close)


def main() -> int:
    return serve("decoder", DecoderSettings.from_env, services, load)


if __name__ == "__main__":
    exit_now(main())
