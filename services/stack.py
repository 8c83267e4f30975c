"""`samforge up`: the whole local stack on loopback (trainer + registry, encoder, decoder), and the demo client.

Each service runs as its own process (``python -m services.<name>``) with settings passed through the
environment, exactly as in Kubernetes. ``up`` waits until every service reports SERVING on
grpc.health.v1, prints the endpoints, and either runs the demo client (``--demo``) and shuts down, or
stays up until Ctrl-C.

Stopping never leaves a service behind:

- SIGTERM, SIGINT and SIGHUP to ``up`` stop the stack: each service gets SIGTERM (it drains and exits),
  ``up`` waits up to :data:`STOP_TIMEOUT` seconds in total, then SIGKILLs what is left, and exits 0.
- If ``up`` dies without cleaning up (SIGKILL, a crash), each service gets SIGTERM from the kernel
  (Linux ``PR_SET_PDEATHSIG``, set in the child between fork and exec). The kernel sends it when the
  *thread* that forked the child exits, so the services are started from the main thread only; started from
  another thread they run without it. A child whose parent died before the prctl took effect sees a new
  parent pid and exits at once. This also covers a stop signal that lands inside a Popen call.
- Training jobs run in worker processes of their own session; the stack's trainer runs with
  ``SAMFORGE_DETACH_WORKERS=false``, so its SIGTERM stops them too (they checkpoint; the jobs resume at the
  next ``up``).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from services.common.net import free_port

if TYPE_CHECKING:
    import grpc

    from services._generated.sam.v1 import trainer_pb2

SERVICES = ("trainer", "encoder", "decoder")
# seconds ``stop`` waits in total for the services to drain and exit before it SIGKILLs them; longer than a
# service's own drain (SAMFORGE_GRACE_SECONDS, 10 by default)
STOP_TIMEOUT = 30.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class Stack:
    processes: dict[str, subprocess.Popen[bytes]]
    addresses: dict[str, str]
    metrics: dict[str, int]
    var_dir: Path

    def stop(self, timeout: float = STOP_TIMEOUT) -> dict[str, int]:
        """SIGTERM to every service, then wait up to ``timeout`` seconds in total, then SIGKILL the rest."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.processes.items():
            try:
                codes[name] = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


class StopRequested(BaseException):
    """Raised in the main thread by the first stop signal (a BaseException, like KeyboardInterrupt, so that
    no ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While entered: the first of SIGTERM/SIGINT/SIGHUP raises :class:`StopRequested` in the main thread;
    later ones, and any once :meth:`stopping` was called, are ignored so that they cannot cut a stop short."""

    def __init__(self) -> None:
        self._stopping = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stopping(self) -> None:
        self._stopping = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            print(f"{signal.Signals(signum).name}: already stopping", file=sys.stderr, flush=True)
            return
        self._stopping = True
        raise StopRequested(signum)


def die_with_parent() -> Callable[[], None] | None:
    """A Popen ``preexec_fn`` (runs in the child before exec): SIGTERM the child when this process dies.

    None where it cannot work: not Linux, or not the main thread (the kernel signals the child when the
    forking *thread* exits, which for a worker thread is long before the process ends).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: nothing is loaded after fork
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        if prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            os._exit(126)  # no safety net: refuse to start rather than risk an orphan
        if os.getppid() != parent:  # the parent died before the prctl: nobody will signal us
            os._exit(1)

    return set_parent_death_signal


def wait_serving(address: str, *, proc: subprocess.Popen[bytes] | None = None, timeout: float = 180.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    """Poll grpc.health.v1 until SERVING; fail fast if ``proc`` exits (no fixed sleeps)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"service at {address} exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)  # readiness poll interval
    raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s")


def start_stack(var_dir: str | Path = "var", *, model: str = "litemedsam", base_port: int = 0,
                extra_env: dict[str, str] | None = None, log_dir: Path | None = None) -> Stack:
    """Start the three services (ports from ``base_port`` or free ones) and wait until all are SERVING."""
    var = Path(var_dir).resolve()
    for sub in ("registry", "data", "jobs", "onnx"):
        (var / sub).mkdir(parents=True, exist_ok=True)
    offsets = {"encoder": 0, "decoder": 1, "trainer": 2}  # the settings' default ports from 50051
    ports = {name: (base_port + offsets[name] if base_port else free_port()) for name in SERVICES}
    metrics = {name: free_port() for name in SERVICES}
    env = {**os.environ, "SAMFORGE_MODEL": model, "SAMFORGE_REGISTRY_DIR": str(var / "registry"),
           "SAMFORGE_DATA_DIR": str(var / "data"), "SAMFORGE_JOBS_DIR": str(var / "jobs"),
           "SAMFORGE_ONNX_CACHE_DIR": str(var / "onnx"), "SAMFORGE_HOST": "127.0.0.1",
           "SAMFORGE_ENCODER_ADDRESS": f"127.0.0.1:{ports['encoder']}",
           "SAMFORGE_DETACH_WORKERS": "false",  # stopping the stack stops its training workers too
           **(extra_env or {})}
    for name in SERVICES:
        env[f"SAMFORGE_{name.upper()}_PORT"] = str(ports[name])
        env[f"SAMFORGE_{name.upper()}_METRICS_PORT"] = str(metrics[name])
    log_dir = log_dir or var / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    stack = Stack(processes, {n: f"127.0.0.1:{p}" for n, p in ports.items()}, metrics, var)
    try:
        for name in SERVICES:
            with open(log_dir / f"{name}.log", "ab") as log:
                processes[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env,
                                                   stdout=log, stderr=subprocess.STDOUT,
                                                   preexec_fn=die_with_parent())
        for name in SERVICES:
            wait_serving(stack.addresses[name], proc=processes[name])
    except BaseException:
        stack.stop()
        raise
    return stack


# ---------------------------------------------------------------------------------------------- demo client
def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_demo_dataset(root: Path, n: int = 8) -> Path:
    """A small folder data set of generated scenes (images/ + masks_instances/)."""
    import cv2

    from services.demo import demo_scene

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks_instances").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, masks = demo_scene(height=240, width=320, seed=100 + i)
        labels = np.zeros(masks[0].shape, np.uint8)
        for k, m in enumerate(masks, start=1):
            labels[m] = k
        cv2.imwrite(str(root / "images" / f"scene{i:02d}.png"), image[..., ::-1])
        cv2.imwrite(str(root / "masks_instances" / f"scene{i:02d}.png"), labels)
    return root


def run_demo_client(stack: Stack, *, epochs: int = 2, out: Path | None = None,
                    allow_regression: bool = False) -> dict[str, Any]:
    """Segment with several prompts; fine-tune a small adapter; segment again selecting it per request.

    The job is guarded like any other: if the adapter does not beat the base model (or the demo's previous
    version) on the held-out split it ends REJECTED, the summary says so and the adapter step is skipped.
    ``allow_regression`` publishes anyway (the tests' random tiny model never beats zero-shot)."""
    from sam_core.data.prompt_sim import box_from_mask
    from sam_core.evaluation.metrics import dice
    from services._generated.sam.v1 import trainer_pb2  # noqa: F811 - at run time too, for JobState names
    from services.client import BoxPrompt, SamforgeClient
    from services.demo import demo_scene

    image, truth = demo_scene()
    png = _png(image)
    corners = [[float(v) for v in box_from_mask(m)] for m in truth]
    boxes = [BoxPrompt(x0, y0, x1, y1) for x0, y0, x1, y1 in corners]
    summary: dict[str, Any] = {"endpoints": stack.addresses}
    with SamforgeClient(encoder=stack.addresses["encoder"], decoder=stack.addresses["decoder"],
                        trainer=stack.addresses["trainer"]) as client:
        t0 = time.perf_counter()
        info = client.embed(png)
        t1 = time.perf_counter()
        base = client.segment(boxes, embedding_key=info.key, image=png)
        t2 = time.perf_counter()
        summary["base"] = {"embed_ms": round(1e3 * (t1 - t0)), "segment_ms": round(1e3 * (t2 - t1)),
                           "dice": [round(dice(m.mask, t), 3) for m, t in zip(base.masks, truth, strict=True)],
                           "iou_scores": [round(m.iou_score, 3) for m in base.masks]}
        write_demo_dataset(stack.var_dir / "data" / "default" / "demo-scenes")
        job = client.create_job(dataset="demo-scenes", method="decoder", adapter_name="demo", promote_to="prod",
                                allow_regression=allow_regression, epochs=epochs, batch_size=4, lr=1e-4)
        events: list[trainer_pb2.JobEvent] = []
        done = client.wait_job(job.id, timeout=1800, on_event=events.append)
        state = trainer_pb2.JobState.Name(done.state)
        summary["training"] = {"job": done.id, "state": state, "steps": int(done.step),
                               "adapter_version": int(done.adapter_version), "events": len(events),
                               "metrics": dict(done.metrics), "error": done.error}
        if done.adapter_version:
            tuned = client.segment(boxes, embedding_key=info.key, image=png, adapter="demo@prod")
            again = client.segment(boxes, embedding_key=info.key, image=png)  # base still served
            summary["adapter"] = {"adapter": tuned.adapter,
                                  "dice": [round(dice(m.mask, t), 3) for m, t in zip(tuned.masks, truth, strict=True)],
                                  "base_unchanged": [m.iou_score for m in again.masks] ==
                                  [m.iou_score for m in base.masks]}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo_client.json").write_text(json.dumps(summary, indent=2))
    return summary


def cmd_up(args: argparse.Namespace) -> int:
    """Start the stack, then the demo or wait; a stop signal or the end stops every service (exit 0 on a
    requested stop)."""
    with StopSignals() as signals:
        try:
            stack = start_stack(args.var, model=args.model, base_port=args.base_port)
        except StopRequested as stop:  # start_stack stopped what it had started
            print(f"{stop}: stopped during start-up", file=sys.stderr, flush=True)
            return 0
        try:
            return _run_up(stack, args)
        except StopRequested:
            return 0
        finally:
            signals.stopping()
            codes = stack.stop()
            print(json.dumps({"stopped": codes}), file=sys.stderr, flush=True)


DEMO_JOB_OUTCOMES = ("JOB_STATE_SUCCEEDED", "JOB_STATE_REJECTED")


def _run_up(stack: Stack, args: argparse.Namespace) -> int:
    print(json.dumps({"endpoints": stack.addresses, "metrics": {k: f"http://127.0.0.1:{v}/metrics"
                                                                  for k, v in stack.metrics.items()}}, indent=2),
          flush=True)
    if args.demo:
        summary = run_demo_client(stack, epochs=args.epochs, out=Path(args.var) / "demo")
        print(json.dumps(summary, indent=2), flush=True)
        # the pipeline worked if the job ended either way: published, or refused by the publishing guard
        return 0 if summary.get("training", {}).get("state") in DEMO_JOB_OUTCOMES else 1
    print("stack is up; Ctrl-C to stop", file=sys.stderr, flush=True)
    while all(p.poll() is None for p in stack.processes.values()):
        time.sleep(1)  # a stop signal interrupts the sleep (StopRequested)
    return 1


def add_up_args(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="start the local stack (trainer, encoder, decoder) on loopback")
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--var", default="var", help="state folder: registry, data, jobs, logs")
    p.add_argument("--base-port", type=int, default=50051,
                   help="encoder port; decoder +1, trainer +2 (0 = free ports)")
    p.add_argument("--demo", action="store_true", help="run the demo client against the stack, then stop")
    p.add_argument("--epochs", type=int, default=2, help="demo fine-tuning epochs")
    p.set_defaults(func=cmd_up)
