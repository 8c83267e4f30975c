"""``python -m services.encoder``: the encoder service (settings from SAMFORGE_* environment variables).

:func:`services.common.server.serve` runs the process: health answers NOT_SERVING while :func:`load` loads
the weights and builds the engine, SERVING after. SIGTERM/SIGINT: NOT_SERVING, stop accepting, drain
in-flight calls for SAMFORGE_GRACE_SECONDS, then the engine closes (batcher, backend, registry watch, Redis
client); exit 0. A bad setting exits 2, a failed load 1. The service's own modules (torch, the engine) are
imported only after the settings are read, so a bad setting fails at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.server import GrpcService, Loaded, exit_now, serve
from services.common.settings import EncoderSettings


def services() -> Sequence[GrpcService]:
    from .servicer import SERVICE

    return [SERVICE]


def load(settings: EncoderSettings) -> Loaded:
    """The engine, built on the process's compute thread (one OpenMP team: see :mod:`services.common.compute`)."""
    from services.common import compute

    from .engine import build_engine
    from .servicer import SERVICE, EncoderService

    engine = compute.shared().run(build_engine, settings)
    return Loaded({SERVICE.name: EncoderService(engine)}, engine.model_id, engine.close)


def main() -> int:
    return serve("encoder", EncoderSettings.from_env, services, load)


if __name__ == "__main__":
    exit_now(main())
