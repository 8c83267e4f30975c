"""Real servers on loopback: each service runs as its own process (python -m services.<name>), started
with explicit environment variables; readiness is polled through grpc.health.v1 (no sleeps)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_serving(address: str, timeout: float = 120.0, proc: subprocess.Popen | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    """Poll grpc.health.v1 until SERVING (fails fast if the process died): services.stack's poller."""
    from services.stack import wait_serving as poll

    poll(address, proc=proc, timeout=timeout, credentials=credentials)


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


@dataclass
class ServiceProcess:
    name: str
    address: str
    metrics_port: int
    proc: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def start_service(name: str, env: dict[str, str], workdir: Path, *, port: int | None = None,
                  wait: bool = True, credentials=None, module: str | None = None) -> ServiceProcess:
    """Start ``python -m services.<name>`` (or ``module``) with ``env`` on free ports and wait until it is SERVING."""
    port = port or free_port()
    metrics = free_port()
    upper = name.upper()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "SAMFORGE_HOST": "127.0.0.1",
                f"SAMFORGE_{upper}_PORT": str(port), f"SAMFORGE_{upper}_METRICS_PORT": str(metrics),
                "SAMFORGE_THREADS": "1", **env}
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", module or f"services.{name}"], env=full_env, cwd=workdir,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    service = ServiceProcess(name, f"127.0.0.1:{port}", metrics, proc, log_path)
    if wait:
        try:
            wait_serving(service.address, proc=proc, credentials=credentials)
        except Exception:
            service.stop()
            raise RuntimeError(f"{name} did not start:\n{service.log()[-4000:]}") from None
    return service


@contextmanager
def running(name: str, env: dict[str, str], workdir: Path, **kwargs):
    service = start_service(name, env, workdir, **kwargs)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port (installed by .ci/run)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@contextmanager
def started(specs: dict[str, tuple[str, dict[str, str], Path, int | None]]):
    """Start every service at once (imports dominate start-up), then wait until all are SERVING.

    ``specs``: {label: (service name, env, workdir, port or None)}; yields {label: ServiceProcess}. A test may
    replace an entry with a restarted service: every ServiceProcess in the dict at the end is stopped.
    """
    services = {label: start_service(name, env, workdir, port=port, wait=False)
                for label, (name, env, workdir, port) in specs.items()}
    try:
        for service in services.values():
            try:
                wait_serving(service.address, timeout=240, proc=service.proc)
            except Exception:
                raise RuntimeError(f"{service.name} did not start:\n{service.log()[-4000:]}") from None
        yield services
    finally:
        running = [s for s in services.values() if isinstance(s, ServiceProcess)]  # incl. restarted ones
        for service in running:  # SIGTERM all first: they drain in parallel
            if service.proc.poll() is None:
                service.proc.terminate()
        for service in running:
            service.stop()
