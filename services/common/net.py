"""Loopback networking helpers shared by the stack launcher, the Triton test server and the tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listened on a moment ago (the socket is closed again).

    Another process may take it before the caller binds it; callers that start a server on it fail loudly
    then, never silently.
    """
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
