"""Dynamic batching of encoder work: one thread, a queue bounded in images and bytes, batches grouped by model.

Request threads :meth:`DynamicBatcher.submit` an :class:`EncodeJob` and wait on its future. What a job holds is
bounded by its kind: a plain job holds a :class:`~sam_core.inference.predictor.PreparedImage` (the image already
resized by the request thread, at most img_size^2 x 3 bytes whatever the upload's size); a tiled job holds the
full decoded image (:class:`TiledImage`, H x W x 3 bytes), which tiling needs.

Admission (:meth:`DynamicBatcher.submit`) refuses at once with :class:`~sam_core.errors.Overloaded` (the services
map it to RESOURCE_EXHAUSTED), each message with a retry hint, when

- ``queue_size`` jobs already wait;
- the bytes the batcher holds (jobs queued *and* being encoded) plus the new job's would exceed ``queue_bytes``
  (a single job larger than ``queue_bytes`` is :class:`~sam_core.errors.ImageTooLarge` instead: retrying
  cannot help);
- the caller's remaining deadline is shorter than the estimated time to finish its job:
  (encoder images held, queued and in flight, + the job's own) x the measured seconds per image / ``concurrency``.
  Seconds per image is an exponentially weighted mean over this batcher's encoder calls (call time / images);
  until the first call has been measured every job is admitted.

The batcher thread takes the oldest job, waits up to ``max_wait_s`` for up to ``max_batch`` jobs, drops jobs
nobody waits for any more (client gone or deadline passed: ``is_active()`` false), groups the rest by model
(the base encoder, each encoder-side adapter) and runs one ``Predictor.encode_prepared`` per group. Failures are
isolated per job: when a group's encoder call fails, its jobs are encoded again one at a time, so only the job
that fails alone gets the exception and its neighbours (other requests, other tenants) get their embeddings.
Backend conditions that no job causes (:class:`~sam_core.errors.Overloaded`, :class:`~sam_core.errors.Unavailable`)
fail the group without a retry. With ``concurrency`` > 1 (a remote backend such as Triton) up to that many
batches run at once on a small thread pool; the batcher takes the next batch only when a slot is free, so the
bounded queue still pushes back. A tiled job is encoded on its own with
:func:`sam_core.inference.tiling.encode_tiled` (whole image + tiles, ``max_batch`` images per encoder call).
Results are ``(value, encode_ms)``.

Batched features are copied out of the batch tensor, so each cached embedding owns exactly its bytes.
Note: a batch of B images may differ from B single encodes in the last float bits (different kernels).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from sam_core.errors import ImageTooLarge, Overloaded, Unavailable
from sam_core.inference.predictor import Predictor, PreparedImage
from sam_core.inference.tiling import TiledEmbedding, encode_tiled, tile_origins
from sam_core.inference.types import Embedding
from services.common import compute, metrics
from services.common.status import Cancelled

log = logging.getLogger("samforge.encoder.batcher")
Encoded = tuple[Embedding | TiledEmbedding, float]
"""What a job's future resolves to: (the embedding, or whole image + tiles; encode_ms)."""
EWMA_WEIGHT = 0.3
"""Weight of the newest encoder call in the seconds-per-image estimate."""
NOT_ITEM_FAULTS = (Overloaded, Unavailable)
"""Group failures that are the backend's condition, not one job's: not retried one job at a time."""


@dataclass(frozen=True)
class TiledImage:
    """A tiled job's input: the full H x W x 3 uint8 image and its (tile_size, overlap)."""

    image: np.ndarray
    tile_size: int
    overlap: int

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes)

    @property
    def encoder_images(self) -> int:
        """Encoder passes: the whole image and each tile."""
        return 1 + len(tile_origins(self.image.shape[:2], self.tile_size, self.overlap))


@dataclass(eq=False)
class EncodeJob:
    """One image to encode with ``predictor``: prepared for the model, or tiled (see the module docstring)."""

    predictor: Predictor
    work: PreparedImage | TiledImage
    is_active: Callable[[], bool] = lambda: True
    future: Future[Encoded] = field(default_factory=Future)

    @property
    def nbytes(self) -> int:
        return self.work.nbytes

    @property
    def encoder_images(self) -> int:
        return self.work.encoder_images if isinstance(self.work, TiledImage) else 1


def _own(embedding: Embedding) -> Embedding:
    """Copy feature levels that are a view into a larger (batch) tensor."""
    def owned(level: torch.Tensor) -> torch.Tensor:
        return level.clone() if level.untyped_storage().nbytes() > level.nelement() * level.element_size() else level

    embedding.features = {name: owned(t) for name, t in embedding.features.items()}
    return embedding


class DynamicBatcher:
    """Bounded queue + one batching thread running up to ``concurrency`` batches at once.

    Counters: ``encodes`` (images), ``batch_sizes`` (recent encoder calls); ``held_bytes`` / ``held_images``: the
    jobs queued or being encoded; ``seconds_per_image``: the measured encode time (None before the first call).
    """

    def __init__(self, *, max_batch: int = 4, max_wait_s: float = 0.005, queue_size: int = 32,
                 queue_bytes: int = 1 << 28, concurrency: int = 1) -> None:
        self.max_batch = max(1, int(max_batch))
        self.concurrency = max(1, int(concurrency))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.queue_size = queue_size
        self.queue_bytes = int(queue_bytes)
        self.encodes = 0
        self.batch_sizes: deque[int] = deque(maxlen=1024)
        self.held_bytes = 0
        self.held_images = 0
        self.seconds_per_image: float | None = None
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

    def submit(self, job: EncodeJob, time_remaining: float | None = None) -> Future[Encoded]:
        """Queue ``job``; ``time_remaining``: the caller's deadline in seconds from now (None: no deadline).

        Overloaded when the queue is full in jobs or bytes or the estimated wait exceeds ``time_remaining``;
        ImageTooLarge for a job larger than the whole byte bound; Unavailable after :meth:`close`.
        """
        if self._closed.is_set():
            raise Unavailable("the encoder is shutting down")
        if job.nbytes > self.queue_bytes:
            raise ImageTooLarge(f"a {_shape(job)} image holds {job.nbytes} bytes while queued, more than the encoder "
                                f"holds for all queued images (SAMFORGE_QUEUE_BYTES={self.queue_bytes}); send a "
                                "smaller image", field="image")
        with self._count_lock:
            self._admit(job, time_remaining)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise Overloaded(f"the encoder queue is full ({self.queue_size} images waiting); "
                                 f"retry after ~{self._drain_hint()} s") from None
            self.held_bytes += job.nbytes
            self.held_images += job.encoder_images
        job.future.add_done_callback(lambda _: self._release(job))
        metrics.QUEUE_DEPTH.set(self.depth())
        return job.future

    def close(self, timeout: float = 30.0) -> None:
        """Finish the batches in progress, fail queued jobs with Unavailable, stop the threads."""
        self._closed.set()
        self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._fail_queued()

    # ------------------------------------------------------------------ admission
    def _admit(self, job: EncodeJob, time_remaining: float | None) -> None:
        """Refuse ``job`` (Overloaded) over the byte bound or when it cannot finish in time; under _count_lock."""
        if self.held_bytes + job.nbytes > self.queue_bytes:
            raise Overloaded(f"the encoder holds {self.held_bytes} bytes of images; {job.nbytes} more would exceed "
                             f"SAMFORGE_QUEUE_BYTES={self.queue_bytes}; retry after ~{self._drain_hint()} s")
        if time_remaining is None or self.seconds_per_image is None:
            return
        estimate = (self.held_images + job.encoder_images) * self.seconds_per_image / self.concurrency
        if estimate > time_remaining:
            raise Overloaded(f"estimated wait {estimate:.1f} s ({self.held_images} images ahead, "
                             f"{self.seconds_per_image:.2f} s each) exceeds the request deadline "
                             f"{max(0.0, time_remaining):.1f} s; retry after ~{self._drain_hint()} s")

    def _drain_hint(self) -> int:
        """Whole seconds (>= 1) until the work held now is done, by the current estimate."""
        per_image = self.seconds_per_image or 0.0
        return max(1, math.ceil(self.held_images * per_image / self.concurrency))

    def _release(self, job: EncodeJob) -> None:
        with self._count_lock:
            self.held_bytes -= job.nbytes
            self.held_images -= job.encoder_images

    def _measured(self, images: int, seconds: float) -> None:
        per_image = seconds / max(1, images)
        with self._count_lock:
            last = self.seconds_per_image
            self.seconds_per_image = per_image if last is None else last + EWMA_WEIGHT * (per_image - last)

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
        tiled: list[tuple[EncodeJob, TiledImage]] = []
        for job in jobs:
            if not job.is_active():
                job.future.set_exception(Cancelled("the caller went away (or its deadline passed) while queued"))
            elif isinstance(job.work, TiledImage):
                tiled.append((job, job.work))
            else:
                groups.setdefault(id(job.predictor), []).append(job)
        for group in groups.values():
            self._encode_group(group)
        for job, work in tiled:
            self._encode_tiled(job, work)

    def _record(self, images: int, per_call: int, seconds: float) -> None:
        self._measured(images, seconds)
        with self._count_lock:
            self.encodes += images
            for start in range(0, images, per_call):
                self.batch_sizes.append(min(per_call, images - start))
        metrics.ENCODES.inc(images)
        for start in range(0, images, per_call):
            metrics.BATCH_SIZE.observe(min(per_call, images - start))

    def _encode_group(self, group: list[EncodeJob]) -> None:
        """One encoder call for ``group``; if it fails, each job again on its own (see the module docstring)."""
        start = time.perf_counter()
        try:
            embeddings = group[0].predictor.encode_prepared([_prepared(job) for job in group])
        except Exception as exc:
            if len(group) == 1 or isinstance(exc, NOT_ITEM_FAULTS):
                log.exception("encoding %d image(s) failed", len(group))
                for job in group:
                    job.future.set_exception(exc)
                return
            log.warning("a batch of %d images failed (%s: %s); encoding them one at a time", len(group),
                        type(exc).__name__, exc)
            for job in group:
                self._encode_group([job])
            return
        seconds = time.perf_counter() - start
        self._record(len(group), len(group), seconds)
        for job, embedding in zip(group, embeddings, strict=True):
            job.future.set_result((_own(embedding), 1e3 * seconds))

    def _encode_tiled(self, job: EncodeJob, work: TiledImage) -> None:
        start = time.perf_counter()
        try:
            value: TiledEmbedding = encode_tiled(job.predictor, work.image, tile_size=work.tile_size,
                                                 overlap=work.overlap, batch_size=self.max_batch)
        except Exception as exc:
            log.exception("tiled encoding failed")
            job.future.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        self._record(1 + len(value.tiles), self.max_batch, seconds)
        value.whole = _own(value.whole)
        value.tiles = [_own(t) for t in value.tiles]
        job.future.set_result((value, 1e3 * seconds))


def _prepared(job: EncodeJob) -> PreparedImage:
    if not isinstance(job.work, PreparedImage):
        raise TypeError("a tiled job in an encoder group")  # _run_batch routes tiled jobs to _encode_tiled
    return job.work


def _shape(job: EncodeJob) -> str:
    height, width = (job.work.image.shape[:2] if isinstance(job.work, TiledImage) else job.work.original_size)
    return f"{height}x{width}"
