"""The encoder service's logic (no protobuf types): keys, caches, single-flight, batching, adapters, tiling.

:meth:`EmbeddingEngine.embed` for one request:

1. read the image header and check the byte / pixel limits (errors name the field ``image``), then decode it
   holding its decode cost (:data:`~services.common.memory.DECODE_BYTES_PER_PIXEL` x its pixels) of
   ``SAMFORGE_DECODE_BYTES`` (:class:`~services.common.byte_semaphore.ByteSemaphore`, :attr:`decode_budget`)
   until step 5 has turned it into the queued job, an L1 hit or a follower's wait: never across the batch
   wait. A request waits for room until its deadline (``time_remaining``), then RESOURCE_EXHAUSTED;
2. resolve the adapter for the tenant (:class:`~services.common.adapter_models.AdapterModels`);
3. key: ``embedding_key(image_content_hash, model_id, preprocess_version, encoder_adapter)`` (the canonical
   sam_core key) combined by :func:`client_key` with the tenant, the tiling geometry and the encoder
   precision into the key the client sees. Keys are tenant-scoped: another tenant's key is NOT_FOUND;
4. L1 (:class:`~sam_core.inference.embedding_cache.MemoryEmbeddingLRU`, ``SAMFORGE_CACHE_BYTES``) -> single-flight
   (concurrent requests for one key share one future) -> L2 (Redis, optional) -> the dynamic batcher;
5. before a job joins a batch the request thread resizes the image for the model
   (:meth:`~sam_core.inference.predictor.Predictor.prepare`): an image that cannot be preprocessed fails its own
   request with INVALID_ARGUMENT (field ``image``), never a batch, and the queued job holds the resized image
   only (a tiled job keeps the full image). The batcher admits the job against ``SAMFORGE_QUEUE_SIZE``,
   ``SAMFORGE_QUEUE_BYTES`` and the caller's remaining deadline (``time_remaining``), refusing at once with
   RESOURCE_EXHAUSTED and a retry hint (:mod:`services.encoder.batcher`). The admission decision of the leader
   of a single-flight is shared by its followers.

L1 holds features on the encoder's device: on CUDA the cache budget is GPU memory (features are copied
back to the GPU after ``Predictor.encode``, which returns CPU tensors, and to the CPU again when streamed);
on CPU it is host memory. Entries are never shared between tenants, even for identical images, so a
tenant cannot learn from cache timing what another tenant embedded. :meth:`EmbeddingEngine.stats` is scoped
the same way: one tenant's entries, bytes, counters and adapters (:mod:`.usage`); only capacity figures
(cache budget, queue depth, model, device) are the shared encoder's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np
import torch

from sam_core.adapters.factory import open_store
from sam_core.adapters.store import AdapterStore
from sam_core.errors import InvalidInput, NotFound, SamforgeError
from sam_core.inference.embedding_cache import MemoryEmbeddingLRU, embedding_key
from sam_core.inference.predictor import Predictor, PreparedImage
from sam_core.inference.tiling import DEFAULT_OVERLAP, TiledEmbedding, tile_origins
from sam_core.io.images import image_content_hash, open_image
from sam_core.modeling.encoder_opt import cpu_has_native_bf16
from sam_core.modeling.registry import LoadedModel, load_model, resolve_device
from services.common import metrics
from services.common.adapter_models import AdapterModels, ModelHandle
from services.common.byte_semaphore import ByteSemaphore
from services.common.embedding_codec import ServedEmbedding
from services.common.memory import (
    DECODE_BYTES_PER_PIXEL,
    MemoryBudget,
    encoder_settings_budget,
    measure_encode_bytes,
    transfer_bytes,
)
from services.common.settings import EncoderSettings
from services.common.status import Cancelled
from services.common.tiling import TilingRequest

from .backends import EncoderBackend, build_backend
from .batcher import DynamicBatcher, EncodeJob, TiledImage
from .l2 import RedisL2
from .usage import TenantUsage, UsageBook

log = logging.getLogger("samforge.encoder.engine")
KEY_FORMAT = "samforge-encoder-key-v1"
MIN_TILE = 32
MAX_TILES = 64
_KEY_RE = re.compile(r"[0-9a-f]{64}")
FlightResult = tuple[ServedEmbedding, float, bool]
"""What a single-flight computation resolves to: (value, encode_ms, cached)."""


@dataclass(frozen=True)
class EmbedResult:
    """``source``: "l1" | "l2" | "encoder" (this request's encode) | "shared" (another request's encode)."""

    key: str
    value: ServedEmbedding
    cached: bool
    encode_ms: float
    source: str


@dataclass(frozen=True)
class EngineStats:
    """Field names match ``sam.v1.StatsResponse``: one tenant's figures, except the shared capacity
    (``cache_budget_bytes``, ``queue_depth``, ``model_id``, ``device``)."""

    cache_entries: int
    cache_bytes: int
    cache_budget_bytes: int
    hits: int
    misses: int
    evictions: int
    encodes: int
    queue_depth: int
    model_id: str
    device: str
    loaded_adapters: list[str]
    l2_hits: int


@dataclass
class CachedEmbedding:
    """An L1 entry: the value and the tenant that owns it (``nbytes`` is what the byte budget counts)."""

    tenant: str
    value: ServedEmbedding

    @property
    def nbytes(self) -> int:
        return self.value.nbytes


@dataclass(eq=False)
class _Flight:
    """One in-progress computation of a key; result ``(value, encode_ms, cached)``."""

    future: Future[FlightResult] = field(default_factory=Future)
    waiters: list[Callable[[], bool]] = field(default_factory=list)

    def any_active(self) -> bool:
        return any(active() for active in list(self.waiters))


def client_key(tenant: str, base_key: str, tiling: tuple[int, int] | None, precision: str) -> str:
    """sha256 of (tenant, canonical embedding_key, (tile_size, overlap) or None, "fp32" | "bf16")."""
    payload = json.dumps([KEY_FORMAT, tenant, base_key, list(tiling) if tiling else None, precision],
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _always() -> bool:
    return True


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class EmbeddingEngine:
    """Thread-safe embedding service logic over one base model (see the module docstring)."""

    def __init__(self, model: LoadedModel, settings: EncoderSettings, *, device: str = "cpu",
                 store: AdapterStore | None = None, l2: RedisL2 | None = None, watch_interval: float = 1.0,
                 backend: EncoderBackend | None = None) -> None:
        self.settings = settings
        self.backend = backend or EncoderBackend("torch")
        self.device = torch.device(device)
        self.precision = "bf16" if settings.bf16 else "fp32"
        if settings.bf16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("SAMFORGE_BF16=true on a CPU without AVX512_BF16/AMX: bf16 is emulated and slower than "
                        "fp32 here (see bench/speed.py)")
        autocast = torch.bfloat16 if settings.bf16 else None

        def make_predictor(loaded: LoadedModel) -> Predictor:
            return Predictor(loaded, device=self.device, autocast_dtype=autocast)

        self.base = Predictor(model, device=self.device, autocast_dtype=autocast, encoder_fn=self.backend.encode)
        self.adapters = AdapterModels(self.base, store, settings.adapter_cache, make_predictor,
                                      watch_interval=watch_interval)
        self.l1: MemoryEmbeddingLRU[CachedEmbedding] = MemoryEmbeddingLRU(int(settings.cache_bytes))
        self.l2 = l2
        self.batcher = DynamicBatcher(max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1e3,
                                      queue_size=settings.queue_size, queue_bytes=settings.queue_bytes,
                                      concurrency=self.backend.concurrency)
        self.decode_budget = ByteSemaphore(settings.decode_bytes, setting="SAMFORGE_DECODE_BYTES")
        self._flights: dict[str, _Flight] = {}
        self.usage = UsageBook()
        self._lock = threading.Lock()
        for cache in ("l1", "l2"):  # export the series at 0 before the first request
            for counter in (metrics.CACHE_HITS, metrics.CACHE_MISSES, metrics.CACHE_EVICTIONS):
                counter.labels(cache=cache)
        metrics.CACHE_BYTES.labels(cache="l1").set(0)

    @property
    def model_id(self) -> str:
        return self.base.model_id

    # ------------------------------------------------------------------ public API
    def embed(self, tenant: str, image: bytes, *, adapter: str = "", tiling: TilingRequest | None = None,
              is_active: Callable[[], bool] = _always, time_remaining: float | None = None) -> EmbedResult:
        """Embed an encoded image for ``tenant`` (``tenant`` already validated by the caller).

        ``is_active`` reports whether the caller still waits (gRPC ``context.is_active``); queued work
        nobody waits for is skipped. ``time_remaining``: seconds until the caller's deadline (gRPC
        ``context.time_remaining()``; None: no deadline). Raises InvalidInput (bad image / tiling), NotFound /
        AdapterInvalid (adapter), Overloaded (no room in SAMFORGE_DECODE_BYTES before the deadline, the queue
        full in jobs or bytes, or the estimated wait exceeds the deadline), Cancelled (caller gone while waiting).
        """
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        with open_image(image, max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_pixels,
                        field="image") as header, \
                self.decode_budget.hold(DECODE_BYTES_PER_PIXEL * header.pixels, _remaining(deadline), is_active):
            started = self._start(tenant, header.decode(), adapter, tiling, is_active)
        if isinstance(started, EmbedResult):
            return started
        key, flight, job = started
        if job is None:  # a follower: another request computes the key
            value, encode_ms, cached = self._wait(flight, is_active)
            return EmbedResult(key, value, cached, encode_ms, "l2" if cached else "shared")
        result = self._lead(key, tenant, flight, job, deadline)
        if result.source == "encoder":
            images = 1 + len(result.value.tiles) if isinstance(result.value, TiledEmbedding) else 1
            self.usage.add(tenant, TenantUsage(encodes=images))
        return result

    def get(self, tenant: str, key: str) -> ServedEmbedding:
        """The cached embedding ``key`` of ``tenant`` (L1, then L2); NotFound if absent or another tenant's."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise InvalidInput("expected the 64-character hex key returned by Embed", field="key")
        found = self._l1_get(key, tenant)
        if found is None:
            found = self._l2_get(key, tenant)
            if found is not None:
                self._l1_put(key, CachedEmbedding(tenant, self._place(found)))
        if found is None:
            raise NotFound(f"embedding {key} is not cached (evicted, expired or never computed); "
                           "send the image to Embed again", field="key")
        return found

    def stats(self, tenant: str) -> EngineStats:
        """``tenant``'s cache entries, bytes, counters and loaded adapters, and the shared capacity figures."""
        mine = [entry.nbytes for entry in self.l1.values() if entry.tenant == tenant]
        usage = self.usage.of(tenant)
        return EngineStats(
            cache_entries=len(mine), cache_bytes=sum(mine), cache_budget_bytes=self.l1.max_bytes, hits=usage.hits,
            misses=usage.misses, evictions=max(0, usage.stored - len(mine)), encodes=usage.encodes,
            queue_depth=self.batcher.depth(), model_id=self.model_id, device=str(self.device),
            loaded_adapters=self.adapters.loaded(tenant), l2_hits=usage.l2_hits)

    def close(self) -> None:
        """Stop the batcher (queued work fails UNAVAILABLE), the backend, the registry watch and the Redis client."""
        self.batcher.close()
        self.backend.close()
        self.adapters.close()
        if self.l2 is not None:
            self.l2.close()

    # ------------------------------------------------------------------ steps
    def _tiling(self, tiling: TilingRequest | None, size: tuple[int, int]) -> tuple[int, int] | None:
        """Validated (tile_size, overlap) with defaults applied, or None when not tiled."""
        if tiling is None:
            return None
        if tiling.tile_size < 0 or tiling.overlap < 0:
            field_name = "tiling.tile_size" if tiling.tile_size < 0 else "tiling.overlap"
            raise InvalidInput("must be >= 0", field=field_name)
        tile = tiling.tile_size or self.base.spec.img_size
        overlap = tiling.overlap or DEFAULT_OVERLAP
        if tile < MIN_TILE:
            raise InvalidInput(f"must be >= {MIN_TILE} pixels, got {tile}", field="tiling.tile_size")
        if overlap >= tile:
            raise InvalidInput(f"must be smaller than the tile size {tile}, got {overlap}", field="tiling.overlap")
        count = len(tile_origins(size, tile, overlap))
        if count > MAX_TILES:
            raise InvalidInput(f"{size[0]}x{size[1]} pixels in {tile} px tiles with {overlap} px overlap gives "
                               f"{count} tiles, more than {MAX_TILES}; use larger tiles", field="tiling.tile_size")
        return tile, overlap

    def _join(self, key: str, tenant: str, is_active: Callable[[], bool]) -> tuple[_Flight | CachedEmbedding, bool]:
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.waiters.append(is_active)
                return flight, False
            if key in self.l1:  # completed between our L1 miss and taking the lock
                found = self._l1_get(key, tenant, count=False)
                if found is not None:
                    return CachedEmbedding(tenant, found), False
            flight = _Flight(waiters=[is_active])
            self._flights[key] = flight
            return flight, True

    def _wait(self, flight: _Flight, is_active: Callable[[], bool]) -> FlightResult:
        while True:
            try:
                return flight.future.result(timeout=0.25)
            except FutureTimeout:
                if not is_active():
                    raise Cancelled("the caller went away (or its deadline passed) while waiting") from None

    def _start(self, tenant: str, canonical: np.ndarray, adapter: str, tiling: TilingRequest | None,
               is_active: Callable[[], bool]) -> EmbedResult | tuple[str, _Flight, EncodeJob | None]:
        """Steps 2-5 for a decoded image, up to the job a leader queues: an L1 hit, or the key, its flight and
        the job (None for a follower). Returns holding no full-size image (a tiled job keeps its own)."""
        handle = self.adapters.resolve(tenant, adapter)
        self.backend.check_adapter(handle.encoder_adapter, handle.label)
        geometry = self._tiling(tiling, canonical.shape[:2])
        base_key = embedding_key(image_content_hash(canonical), self.base.model_id,
                                 self.base.spec.preprocess_version, handle.encoder_adapter)
        key = client_key(tenant, base_key, geometry, self.precision)
        found = self._l1_get(key, tenant)
        if found is not None:
            return EmbedResult(key, found, True, 0.0, "l1")
        flight, leader = self._join(key, tenant, is_active)
        if isinstance(flight, CachedEmbedding):  # filled while we took the lock
            return EmbedResult(key, flight.value, True, 0.0, "l1")
        if not leader:
            return key, flight, None
        try:
            shared = self._l2_get(key, tenant)  # before the resize: an L2 hit needs no job
            if shared is not None:
                return self._publish(key, tenant, flight, shared, 0.0, cached=True)
            return key, flight, self._job(handle, canonical, geometry, flight)
        except BaseException as exc:
            self._finish(key, flight, exc)
            raise

    def _job(self, handle: ModelHandle, image: np.ndarray, geometry: tuple[int, int] | None,
             flight: _Flight) -> EncodeJob:
        """The batcher job for ``image``: resized for the model here, in the request thread (tiled: full size)."""
        predictor = self.adapters.predictor(handle)
        if geometry is not None:
            return EncodeJob(predictor, TiledImage(image, *geometry), flight.any_active)
        return EncodeJob(predictor, _prepare(predictor, image), flight.any_active)

    def _lead(self, key: str, tenant: str, flight: _Flight, job: EncodeJob, deadline: float | None) -> EmbedResult:
        """Compute ``key`` with the batcher and publish it (L2 was looked up by :meth:`_start`)."""
        try:
            value, encode_ms = self.batcher.submit(job, _remaining(deadline)).result()
        except BaseException as exc:
            self._finish(key, flight, exc)
            raise
        return self._publish(key, tenant, flight, value, encode_ms, cached=False)

    def _publish(self, key: str, tenant: str, flight: _Flight, value: ServedEmbedding, encode_ms: float, *,
                 cached: bool) -> EmbedResult:
        """Put ``value`` in L1 (and L2 when this request encoded it) and hand it to the flight's followers."""
        try:
            value = self._place(value)
            self._l1_put(key, CachedEmbedding(tenant, value))
        except BaseException as exc:
            self._finish(key, flight, exc)
            raise
        self._finish(key, flight, (value, encode_ms, cached))
        if not cached and self.l2 is not None:
            self.l2.put(key, tenant, value)
        return EmbedResult(key, value, cached, encode_ms, "l2" if cached else "encoder")

    def _finish(self, key: str, flight: _Flight, outcome: FlightResult | BaseException) -> None:
        with self._lock:
            self._flights.pop(key, None)
        if isinstance(outcome, BaseException):
            flight.future.set_exception(outcome)
        else:
            flight.future.set_result(outcome)

    def _place(self, value: ServedEmbedding) -> ServedEmbedding:
        """Move features to the encoder's device for L1 (a no-op on CPU)."""
        if self.device.type == "cpu":
            return value
        parts = [value.whole, *value.tiles] if isinstance(value, TiledEmbedding) else [value]
        for part in parts:
            part.features = {name: t.to(self.device) for name, t in part.features.items()}
        return value

    # ------------------------------------------------------------------ caches
    def _l1_get(self, key: str, tenant: str, *, count: bool = True) -> ServedEmbedding | None:
        entry = self.l1.get(key)
        value = entry.value if entry is not None and entry.tenant == tenant else None
        if count:
            (metrics.CACHE_HITS if value is not None else metrics.CACHE_MISSES).labels(cache="l1").inc()
            self.usage.add(tenant, TenantUsage(hits=1) if value is not None else TenantUsage(misses=1))
        return value

    def _l1_put(self, key: str, entry: CachedEmbedding) -> None:
        with self._lock:
            before, fresh = self.l1.evictions, key not in self.l1
            stored = self.l1.put(key, entry)
            evicted = self.l1.evictions - before
        self.usage.add(entry.tenant, TenantUsage(stored=int(stored and fresh)))
        if evicted:
            metrics.CACHE_EVICTIONS.labels(cache="l1").inc(evicted)
        metrics.CACHE_BYTES.labels(cache="l1").set(self.l1.bytes)

    def _l2_get(self, key: str, tenant: str) -> ServedEmbedding | None:
        """The L2 entry (None without L2 or on a miss; a miss is counted only with L2)."""
        if self.l2 is None:
            return None
        value = self.l2.get(key, tenant)
        (metrics.CACHE_HITS if value is not None else metrics.CACHE_MISSES).labels(cache="l2").inc()
        if value is not None:
            self.usage.add(tenant, TenantUsage(l2_hits=1))
        return value


def _prepare(predictor: Predictor, image: np.ndarray) -> PreparedImage:
    """``predictor.prepare(image)``; an image that decoded but cannot be resized is the request's InvalidInput."""
    try:
        return predictor.prepare(image)
    except (SamforgeError, MemoryError):
        raise
    except Exception as exc:
        log.warning("a %dx%d image cannot be preprocessed", image.shape[0], image.shape[1], exc_info=True)
        raise InvalidInput(f"the {image.shape[0]}x{image.shape[1]} image cannot be resized to the model's input "
                           f"({type(exc).__name__}: {exc})", field="image") from exc


def encode_bytes_per_image(engine: EmbeddingEngine) -> int:
    """One image's encoder working set: measured on a dummy image in-process, the transfer tensors for Triton."""
    base = engine.base
    estimate = transfer_bytes(base.spec.img_size, base.net.feature_shapes().values())
    if engine.backend.name == "triton":
        return estimate
    if base.encoder_fn is None:
        _ = base.encoder  # the optimised encoder's weights belong to the idle base, not to the working set
    dummy = np.zeros((base.spec.img_size, base.spec.img_size, 3), np.uint8)
    measured = measure_encode_bytes(lambda: base.encode([dummy]))
    if measured is None:
        log.warning("cannot measure the encoder's working set here (no /proc/self/clear_refs); the memory budget "
                    "counts only its input and output tensors")
        return estimate
    return max(measured, estimate)


def memory_budget(engine: EmbeddingEngine, settings: EncoderSettings) -> MemoryBudget:
    """What :mod:`services.common.memory` allows this encoder above its idle base."""
    return encoder_settings_budget(settings, encode_bytes_per_image=encode_bytes_per_image(engine),
                                   cache_on_host=engine.device.type == "cpu")


def build_engine(settings: EncoderSettings) -> EmbeddingEngine:
    """Load the base model (``SAMFORGE_MODEL`` / ``SAMFORGE_CHECKPOINT``) and wire registry, L2 and batcher."""
    device = resolve_device(settings.device)
    model = load_model(settings.model, settings.checkpoint or None, device=device)
    l2 = None
    if settings.redis_url:
        try:
            l2 = RedisL2(settings.redis_url, settings.redis_ttl_seconds)
        except ValueError as exc:
            raise InvalidInput(f"not a usable Redis URL ({exc})", field="SAMFORGE_REDIS_URL") from exc
    backend = build_backend(settings, model)
    store = open_store(settings.registry_url, settings.registry_dir, endpoint_url=settings.s3_endpoint_url)
    engine = EmbeddingEngine(model, settings, device=device, store=store, l2=l2, backend=backend)
    budget = memory_budget(engine, settings)
    metrics.MEMORY_BUDGET.set(budget.total)
    log.info("memory budget above the idle base: %s", budget.describe())
    log.info("encoder ready: model %s on %s (%s backend), cache %d bytes, batch <= %d (wait %.1f ms), queue %d, L2 %s",
             engine.model_id, device, backend.name, settings.cache_bytes, settings.max_batch, settings.max_wait_ms,
             settings.queue_size, "on" if l2 else "off")
    return engine
