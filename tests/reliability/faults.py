"""kill -9 scenarios on a running stack, shared by ``tests/reliability/test_faults.py`` (which asserts on what they
return) and ``bench/fault_recovery.py`` (which records the recovery times).

* :class:`SegmentLoad`: client threads sending the same Segment request in a loop, every outcome timed;
* :func:`kill_and_restart`: SIGKILL one service, start it again on the same port with the same settings, and
  report the seconds from the kill to SERVING;
* :func:`train_through_a_kill`: a job killed mid-training with its trainer, resumed by the restarted trainer
  (the step it resumed from is the one ``sam_core.training.loop`` logs), while a poller watches the registry
  for a listed adapter that is not complete.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services._generated.sam.v1 import decoder_pb2, trainer_pb2
from tests.conftest import noise_png
from tests.integration.conftest import ServiceProcess, start_service
from tests.reliability.harness import AS_A, SERVING, Clients, call, health

Specs = dict[str, tuple[str, dict[str, str], Path, int | None]]
IMAGE = noise_png(11, 80, 120)
BOXES = [(4, 4, 60, 50), (30, 20, 110, 78), (0, 0, 120, 80)]


def segment_request(key: str = "") -> decoder_pb2.SegmentRequest:
    """Image and key: the decoder re-embeds when the encoder lost the key (a restart)."""
    prompts = [decoder_pb2.Prompt(box=decoder_pb2.Box(x0=a, y0=b, x1=c, y1=d)) for a, b, c, d in BOXES]
    return decoder_pb2.SegmentRequest(image=IMAGE, embedding_key=key, prompts=prompts, multimask=True)


def masks_of(reply: decoder_pb2.SegmentResponse) -> list[tuple[str, float]]:
    return [(mask.rle_counts, mask.iou_score) for result in reply.results for mask in result.masks]


@dataclass(frozen=True)
class Timed:
    start: float
    end: float
    code: grpc.StatusCode
    masks: list[tuple[str, float]] | None


@dataclass
class SegmentLoad:
    """``threads`` clients calling Segment on the decoder in a loop until :meth:`stop`."""

    address: str
    request: decoder_pb2.SegmentRequest
    threads: int = 3
    outcomes: list[Timed] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        with Clients({"encoder": self.address, "decoder": self.address, "trainer": self.address}) as clients:
            while not self._stop.is_set():
                start = time.monotonic()
                outcome = call(clients.decoder.Segment, self.request, metadata=AS_A, timeout=30)
                masks = masks_of(outcome.reply) if outcome.code == grpc.StatusCode.OK else None
                self.outcomes.append(Timed(start, time.monotonic(), outcome.code, masks))
                if outcome.code != grpc.StatusCode.OK:
                    time.sleep(0.02)  # a failed call returns at once: pace the retries

    def __enter__(self) -> SegmentLoad:
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)

    def first_ok_after(self, moment: float, timeout: float = 120.0) -> Timed:
        """The first successful call that started after ``moment`` (polls while the load runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [t for t in list(self.outcomes) if t.start > moment and t.code == grpc.StatusCode.OK]
            if done:
                return min(done, key=lambda t: t.end)
            time.sleep(0.05)  # poll interval
        raise AssertionError(f"no successful Segment within {timeout}s after the restart")


def wait_for_serving(address: str, timeout: float = 240.0) -> float:
    """Poll health until SERVING; returns the monotonic time it was first seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if health(address, timeout=1) == SERVING:
                return time.monotonic()
        except grpc.RpcError:
            pass
        time.sleep(0.05)  # readiness poll interval
    raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s")


def kill_and_restart(services: dict[str, ServiceProcess], label: str, specs: Specs,
                     while_down: Callable[[], None] | None = None) -> dict[str, float]:
    """SIGKILL ``services[label]``, run ``while_down()``, restart it on its port; times from the kill (seconds)."""
    old = services[label]
    killed = time.monotonic()
    old.kill()
    if while_down is not None:
        while_down()
    name, env, workdir, _ = specs[label]
    port = int(old.address.rsplit(":", 1)[1])
    services[label] = start_service(name, env, workdir, port=port, wait=False)
    serving = wait_for_serving(old.address)
    return {"killed_at": killed, "kill_to_serving_s": round(serving - killed, 2)}


def _check_listing(clients: Clients, name: str, seen: list[Any], wait_for_ready: bool = False) -> None:
    """Each version of ``name`` listed now must resolve (files complete and matching the index): into ``seen``."""
    listed = call(clients.registry.ListAdapters, trainer_pb2.ListAdaptersRequest(name=name), timeout=10,
                  wait_for_ready=wait_for_ready)
    for adapter in listed.reply.adapters if listed.code == grpc.StatusCode.OK else ():
        got = call(clients.registry.GetAdapter, trainer_pb2.GetAdapterRequest(ref=f"{name}:{adapter.version}"),
                   timeout=10, wait_for_ready=wait_for_ready)
        seen.append((adapter.version, adapter.sha256, got.code, got.reply.sha256 if got.reply else ""))


def _registry_poller(clients: Clients, name: str, stop: threading.Event, seen: list[Any]) -> None:
    """:func:`_check_listing` in a loop until ``stop`` (calls fail UNAVAILABLE while the trainer is down)."""
    while not stop.is_set():
        _check_listing(clients, name, seen)
        time.sleep(0.05)  # poll interval


def train_through_a_kill(services: dict[str, ServiceProcess], specs: Specs, *, kill_at_step: int = 7,
                         name: str = "resumed") -> dict[str, Any]:
    """The trainer is killed (SIGKILL) while a job checkpointing every 3 steps is at ``kill_at_step``: the job's
    worker (its own process, the process executor) keeps training and the restarted trainer re-attaches to it,
    or, when the worker ended meanwhile, re-queues the job, whose new worker resumes from the last checkpoint
    (``resumed_from_step`` is read from the trainer's log, where only an inline job logs it: 0 otherwise)."""
    hp = trainer_pb2.Hyperparameters(epochs=8, batch_size=2, checkpoint_every=3, lr=1e-3)
    request = trainer_pb2.CreateJobRequest(dataset="blobs", method="decoder", adapter_name=name, hyperparameters=hp,
                                           allow_regression=True)  # the random tiny model: publish what it scores
    seen: list[Any] = []
    stop = threading.Event()
    address = services["trainer"].address
    with Clients({"encoder": address, "decoder": address, "trainer": address}) as clients:
        job = clients.trainer.CreateJob(request, metadata=AS_A, timeout=30)
        poller = threading.Thread(target=_registry_poller, args=(clients, name, stop, seen), daemon=True)
        poller.start()
        try:
            watch = clients.trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), metadata=AS_A, timeout=300)
            before = next(e for e in watch if e.phase == "training" and e.job.step >= kill_at_step)
            watch.cancel()
            times = kill_and_restart(services, "trainer", specs)
            events = list(clients.trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), metadata=AS_A,
                                                   timeout=300, wait_for_ready=True))
        finally:
            stop.set()
            poller.join(30)
        # the job can end between two polls (or while the poller's channel backs off after the restart): one last
        # look once it has ended, so the published version is always checked at least once
        _check_listing(clients, name, seen, wait_for_ready=True)
    resumed = re.search(rf"resumed \S*{job.id}\S* at step (\d+)", services["trainer"].log())
    return {**times, "killed_at_step": before.job.step, "resumed_from_step": int(resumed.group(1)) if resumed else 0,
            "final": events[-1].job, "registry_seen": seen}
