"""Dynamic batching of encoder work: one thread, a bounded queue, batches grouped by model.

Request threads :meth:`DynamicBatcher.submit` an :class:`EncodeJob` (a full queue raises
:class:`~sam_core.errors.Overloaded` at once, which the services map to RESOURCE_EXHAUSTED) and wait on its
future. The batcher thread takes the oldest job, waits up to ``max_wait_s`` for up to ``max_batch`` jobs,
drops jobs nobody waits for any more (client gone or deadline passed: ``is_active()`` false), groups the
rest by model (the base encoder, each encoder-side adapter) and runs one ``Predictor.encode`` per group.
With ``concurrency`` > 1 (a remote backend such as Triton) up to that many batches run at once on a small
thread pool; the batcher takes the next batch only when a slot is free, so the bounded queue still pushes back.
A tiled job is encoded on its own with :func:`sam_core.inference.tiling.encode_tiled` (whole image + tiles,
``max_batch`` images per encoder call). Results are ``(value, encode_ms)``.

Batched features are copied out of the batch tensor, so each cached embedding owns exactly its bytes.
Note: a batch of B images may differ from B single encodes in the last float bits (different kernels).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from sam_core.errors import Overloaded, Unavailable
from sam_core.inference.predictor import Predictor
from sam_core.inference.tiling import TiledEmbedding, encode_tiled
from sam_core.inference.types import Embedding
from services.common import compute, metrics
from services.common.status import Cancelled

log = logging.getLogger("samforge.encoder.batcher")
Encoded = tuple[Embedding | TiledEmbedding, float]
"""What a job's future resolves to: (the embedding, or whole image + tiles; encode_ms)."""


@dataclass(eq=False)
class EncodeJob:
    """One image to encode. image: H x W x 3 uint8; tiling: (tile_size, overlap) or None."""

    predictor: Predictor
    image: np.ndarray
    tiling: tuple[int, int] | None = None
    is_active: Callable[[], bool] = lambda: True
    future: Future[Encoded] = field(default_factory=Future)


def _own(embedding: Embedding) -> Embedding:
    """Copy features that are a view into a larger (batch) tensor."""
    features = embedding.features
    if features.untyped_storage().nbytes() > features.nelement() * features.element_size():
        embedding.features = features.clone()
    return embedding


class DynamicBatcher:
    """Bounded queue + one batching thread running up to ``concurrency`` batches at once.

    Counters: ``encodes`` (images), ``batch_sizes`` (recent encoder calls).
    """

    def __init__(self, *, max_batch: int = 4, max_wait_s: float = 0.005, queue_size: int = 32,
                 concurrency: int = 1) -> None:
        self.max_batch = max(1, int(max_batch))
        self.concurrency = max(1, int(concurrency))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.queue_size = queue_size
        self.encodes = 0
        self.batch_sizes: deque[int] = deque(maxlen=1024)
        self._queue: queue.Queue[EncodeJob] = queue.Queue(maxsize=queue_size)
        self._closed = threading.Event()
        self._count_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="encoder-batch") \
            if self.concurrency > 1 else None
        self._thread = threading.Thread(target=self._run, name="encoder-batcher", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        """Jobs waiting (not counting the batch being encoded)."""
        return self._queue.qsize()

    def submit(self, job: EncodeJob) -> Future[Encoded]:
        """Queue ``job``; Overloaded if the queue is full, Unavailable after :meth:`close`."""
        if self._closed.is_set():
            raise Unavailable("the encoder is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"the encoder queue is full ({self.queue_size} images waiting); retry later") from None
        metrics.QUEUE_DEPTH.set(self.depth())
        return job.future

    def close(self, timeout: float = 30.0) -> None:
        """Finish the batches in progress, fail queued jobs with Unavailable, stop the threads."""
        self._closed.set()
        self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._fail_queued()

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        while not self._closed.is_set():
            if not self._slots.acquire(timeout=0.1):
                continue
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                self._slots.release()
                continue
            jobs = self._fill([first])
            metrics.QUEUE_DEPTH.set(self.depth())
            if self._pool is None:  # an in-process model: on the process's one compute thread (see compute)
                compute.shared().run(self._run_in_slot, jobs)
            else:
                self._pool.submit(self._run_in_slot, jobs)
        self._fail_queued()

    def _run_in_slot(self, jobs: list[EncodeJob]) -> None:
        try:
            self._run_batch(jobs)
        except BaseException as exc:  # never let a thread die with futures pending
            log.exception("encoder batch failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        finally:
            self._slots.release()

    def _fill(self, jobs: list[EncodeJob]) -> list[EncodeJob]:
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.future.set_exception(Unavailable("the encoder is shutting down"))
        metrics.QUEUE_DEPTH.set(0)

    def _run_batch(self, jobs: list[EncodeJob]) -> None:
        groups: dict[int, list[EncodeJob]] = {}
        tiled: list[tuple[EncodeJob, tuple[int, int]]] = []
        for job in jobs:
            if not job.is_active():
                job.future.set_exception(Cancelled("the caller went away (or its deadline passed) while queued"))
            elif job.tiling is not None:
                tiled.append((job, job.tiling))
            else:
                groups.setdefault(id(job.predictor), []).append(job)
        for group in groups.values():
            self._encode_group(group)
        for job, tiling in tiled:
            self._encode_tiled(job, tiling)

    def _record(self, images: int, per_call: int) -> None:
        with self._count_lock:
            self.encodes += images
            for start in range(0, images, per_call):
                self.batch_sizes.append(min(per_call, images - start))
        metrics.ENCODES.inc(images)
        for start in range(0, images, per_call):
            metrics.BATCH_SIZE.observe(min(per_call, images - start))

    def _encode_group(self, group: list[EncodeJob]) -> None:
        start = time.perf_counter()
        try:
            embeddings = group[0].predictor.encode([job.image for job in group], batch_size=len(group))
        except Exception as exc:
            log.exception("encoding %d image(s) failed", len(group))
            for job in group:
                job.future.set_exception(exc)
            return
        encode_ms = 1e3 * (time.perf_counter() - start)
        self._record(len(group), len(group))
        for job, embedding in zip(group, embeddings, strict=True):
            job.future.set_result((_own(embedding), encode_ms))

    def _encode_tiled(self, job: EncodeJob, tiling: tuple[int, int]) -> None:
        tile_size, overlap = tiling
        start = time.perf_counter()
        try:
            value: TiledEmbedding = encode_tiled(job.predictor, job.image, tile_size=tile_size, overlap=overlap,
                                                 batch_size=self.max_batch)
        except Exception as exc:
            log.exception("tiled encoding failed")
            job.future.set_exception(exc)
            return
        self._record(1 + len(value.tiles), self.max_batch)
        value.whole = _own(value.whole)
        value.tiles = [_own(t) for t in value.tiles]
        job.future.set_result((value, 1e3 * (time.perf_counter() - start)))
