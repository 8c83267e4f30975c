"""The three service processes share one start-up and shutdown (services.common.server.serve).

* a bad setting exits with status 2 and one log line naming the variable (no traceback);
* health answers NOT_SERVING while the model loads and SERVING after; RPCs fail UNAVAILABLE meanwhile.
  Loading is made observable by running the service with ``load_model`` gated on a named pipe: it blocks
  until the test writes to the pipe, so the test sees the loading phase for as long as it needs;
* SIGTERM after SERVING exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services._generated.sam.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.common.net import free_port
from tests.integration.conftest import ROOT, wait_serving

pytestmark = pytest.mark.integration
SERVICES = ("encoder", "decoder", "trainer")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
# Runs ``services.<argv[2]>`` as __main__ with sam_core's load_model waiting for a line on the pipe argv[1].
GATED = """
import runpy, sys
import sam_core.modeling.registry as registry
gate, service = sys.argv[1], sys.argv[2]
real_load_model = registry.load_model

def gated_load_model(*args, **kwargs):
    with open(gate, "rb") as pipe:  # blocks until the test opens the pipe for writing
        pipe.readline()
    return real_load_model(*args, **kwargs)

registry.load_model = gated_load_model
sys.argv = [service]
runpy.run_module(f"services.{service}", run_name="__main__", alter_sys=True)
"""


def service_env(name: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    port = free_port()
    return {**os.environ, "PYTHONPATH": str(ROOT), "SAMFORGE_HOST": "127.0.0.1", "SAMFORGE_MODEL": "tiny",
            "SAMFORGE_THREADS": "1", f"SAMFORGE_{name.upper()}_PORT": str(port),
            f"SAMFORGE_{name.upper()}_METRICS_PORT": str(free_port()),
            "SAMFORGE_REGISTRY_DIR": str(tmp_path / "registry"), "SAMFORGE_DATA_DIR": str(tmp_path / "data"),
            "SAMFORGE_JOBS_DIR": str(tmp_path / "jobs"), "SAMFORGE_ONNX_CACHE_DIR": str(tmp_path / "onnx"),
            "SAMFORGE_ENCODER_ADDRESS": f"127.0.0.1:{free_port()}", "SAMFORGE_GRACE_SECONDS": "2", **extra}


@pytest.mark.parametrize(("name", "variable", "value"), [
    ("encoder", "SAMFORGE_MAX_BATCH", "0"),
    ("encoder", "SAMFORGE_ENCODER_BACKEND", "tensorrt"),
    ("decoder", "SAMFORGE_DECODER_RUNTIME", "tensorrt"),
    ("trainer", "SAMFORGE_MAX_CONCURRENT_JOBS", "many"),
    ("trainer", "SAMFORGE_LOG_LEVEL", "chatty"),
])
def test_a_bad_setting_exits_2_with_one_line_naming_the_variable(tmp_path, name, variable, value):
    env = service_env(name, tmp_path, **{variable: value})
    done = subprocess.run([sys.executable, "-m", f"services.{name}"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and variable in json.loads(lines[0])["msg"], done.stderr[-2000:]


@pytest.mark.parametrize("name", SERVICES)
def test_a_bad_setting_exits_before_the_service_imports_torch(tmp_path, name):
    """Settings are read before the service's own modules load: a misconfigured pod fails at once."""
    env = service_env(name, tmp_path, SAMFORGE_LOG_LEVEL="chatty")
    probe = f"import sys, services.{name}.__main__ as entry; print(entry.main(), 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.split() == ["2", "False"], done.stderr[-2000:]


@pytest.mark.parametrize("name", SERVICES)
def test_a_tokens_file_with_an_invalid_tenant_exits_2_naming_it(tmp_path, name):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"token-a": "alice", "token-b": "../escape"}))
    env = service_env(name, tmp_path, SAMFORGE_AUTH_TOKENS_FILE=str(tokens))
    # a service that accepted the file would run until the timeout (and fail the test)
    done = subprocess.run([sys.executable, "-m", f"services.{name}"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    message = json.loads(lines[-1])["msg"]
    assert "SAMFORGE_AUTH_TOKENS_FILE" in message and "entry 2" in message and "token-b" not in message
    assert not (tmp_path / "escape").exists()


def first_health_answer(address: str, proc: subprocess.Popen, timeout: float = 180.0) -> int:
    """Poll grpc.health.v1 until the server answers at all; its status (fails if the process exits)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"exited with {proc.returncode} before answering health"
            try:
                return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                time.sleep(0.05)  # poll interval while the server is not listening yet
    raise AssertionError(f"no health answer from {address} within {timeout:.0f}s while the model was loading")


def any_rpc(name: str, channel: grpc.Channel) -> Callable[[], object]:
    """One cheap call of ``name``'s own API (a second arg-free call shape per service)."""
    if name == "encoder":
        return lambda: encoder_pb2_grpc.EncoderServiceStub(channel).Stats(encoder_pb2.StatsRequest(), timeout=10)
    if name == "decoder":  # no image and no key: INVALID_ARGUMENT once loaded
        return lambda: decoder_pb2_grpc.DecoderServiceStub(channel).Segment(decoder_pb2.SegmentRequest(), timeout=10)
    return lambda: trainer_pb2_grpc.TrainerServiceStub(channel).ListJobs(trainer_pb2.ListJobsRequest(), timeout=10)


@contextmanager
def gated_service(name: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    gate = tmp_path / "load-gate"
    os.mkfifo(gate)
    env = service_env(name, tmp_path)
    address = f"127.0.0.1:{env[f'SAMFORGE_{name.upper()}_PORT']}"
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", GATED, str(gate), name], env=env, cwd=tmp_path,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield proc, address, gate
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", SERVICES)
def test_health_is_not_serving_while_loading_then_serving(tmp_path, name):
    with gated_service(name, tmp_path) as (proc, address, gate):
        assert first_health_answer(address, proc) == NOT_SERVING
        with grpc.insecure_channel(address) as channel:
            call = any_rpc(name, channel)
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
            with open(gate, "wb") as pipe:  # let load_model run
                pipe.write(b"go\n")
            wait_serving(address, proc=proc)
            try:
                call()
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and name == "decoder"
        proc.terminate()
        assert proc.wait(60) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
