"""Optional shared L2 embedding cache in Redis (``SAMFORGE_REDIS_URL``).

A value is the safetensors serialisation of one tensor per feature level (named as the level, each
N x C_l x h_l x w_l float32: the whole image, then each tile) whose metadata field ``samforge`` is a JSON
object carrying the embedding's signature (client key, tenant, model id, preprocessing version, encoder
adapter, the levels in order, sizes, tile geometry) and the sha256 of the feature bytes. Values written by
another format version live under another key prefix, so encoders of two versions can share one Redis.
Nothing is ever unpickled. An entry whose signature does not match the key and tenant it is read for, or
whose checksum fails, is logged and treated as a miss.

Redis being down is never the caller's problem: errors are logged (once per outage), L2 is skipped for
``retry_after`` seconds, and the encoder keeps serving from L1 and the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any, Protocol

import safetensors.torch
import torch

from sam_core.inference.tiling import TiledEmbedding
from sam_core.inference.types import Embedding
from services.common.embedding_codec import assemble, parts_of

log = logging.getLogger("samforge.encoder.l2")
FORMAT = "samforge-encoder-l2-v2"
KEY_PREFIX = "samforge:embedding:v2:"


class CorruptEntry(ValueError):
    """An L2 value that must not be served (bad format, signature mismatch, checksum failure)."""


class ForeignEntry(CorruptEntry):
    """A valid entry of another tenant: reported exactly like a missing one (no existence leak, no log noise)."""


def _digest(levels: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in levels.items():
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().data.cast("B"))
    return digest.hexdigest()


def _pair(values: Any) -> tuple[int, int]:
    """A stored (height, width) or (y, x) pair (ValueError / TypeError for anything else)."""
    first, second = values
    return int(first), int(second)


def encode_entry(key: str, tenant: str, value: Embedding | TiledEmbedding) -> bytes:
    """Serialise a cached value (features moved to CPU float32) to safetensors bytes with JSON metadata."""
    parts, origins = parts_of(value)
    first = parts[0]
    levels = {name: torch.cat([p.features[name].detach().to("cpu", torch.float32) for p in parts]).contiguous()
              for name in first.features}
    tiled = value if isinstance(value, TiledEmbedding) else None
    meta = {
        "format": FORMAT, "key": key, "tenant": tenant, "model_id": first.model_id,
        "preprocess_version": first.preprocess_version, "encoder_adapter": first.encoder_adapter or "",
        "original_sizes": [list(map(int, p.original_size)) for p in parts],
        "input_sizes": [list(map(int, p.input_size)) for p in parts],
        "origins": [list(o) for o in origins[1:]] if tiled is not None else None,
        "tile_size": tiled.tile_size if tiled is not None else None,
        "overlap": tiled.overlap if tiled is not None else None,
        "levels": list(levels),
        "features_sha256": _digest(levels),
    }
    data: bytes = safetensors.torch.save(levels, metadata={"samforge": json.dumps(meta, sort_keys=True)})
    return data


def _metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, JSON header)."""
    if len(data) < 8:
        raise CorruptEntry("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise CorruptEntry("safetensors header length exceeds the value")
    try:
        header = json.loads(data[8:8 + size])
        meta = json.loads(header["__metadata__"]["samforge"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"no samforge metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise CorruptEntry("samforge metadata is not a JSON object")
    return meta


def decode_entry(data: bytes, key: str, tenant: str) -> Embedding | TiledEmbedding:
    """Inverse of :func:`encode_entry`; CorruptEntry unless the stored key, tenant and checksum match."""
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise CorruptEntry(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("key") != key:
        raise CorruptEntry("stored key does not match the requested key")
    if meta.get("tenant") != tenant:
        raise ForeignEntry("entry belongs to another tenant")
    levels = _levels(data, meta)
    try:
        count = next(iter(levels.values())).shape[0]
        sizes = [_pair(s) for s in meta["original_sizes"]]
        inputs = [_pair(s) for s in meta["input_sizes"]]
        origins = None if meta["origins"] is None else [_pair(o) for o in meta["origins"]]
        if len(sizes) != count or len(inputs) != count or (origins is not None and len(origins) != count - 1):
            raise CorruptEntry("metadata sizes disagree with the tensor")
        parts = [{name: t[i:i + 1] for name, t in levels.items()} for i in range(count)]
        return assemble(parts, original_sizes=sizes, input_sizes=inputs, origins=origins,
                        model_id=meta["model_id"], preprocess_version=meta["preprocess_version"],
                        encoder_adapter=meta["encoder_adapter"] or None, tile_size=meta["tile_size"],
                        overlap=meta["overlap"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEntry(f"bad metadata ({exc})") from exc


def _levels(data: bytes, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The stored levels in their recorded order, checked: float32, 4-D, one part count, checksum."""
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed bytes
        raise CorruptEntry(f"unreadable tensors ({exc})") from exc
    names = meta.get("levels")
    if not isinstance(names, list) or not names or sorted(names) != sorted(tensors):
        raise CorruptEntry(f"tensors {sorted(tensors)} do not match the levels {names}")
    levels = {str(name): tensors[name] for name in names}
    if any(t.dtype != torch.float32 or t.ndim != 4 for t in levels.values()) \
            or len({t.shape[0] for t in levels.values()}) != 1 or _digest(levels) != meta.get("features_sha256"):
        raise CorruptEntry("features fail their shape/dtype/checksum check")
    return levels


class RedisClient(Protocol):
    """What :class:`RedisL2` uses of a ``redis.Redis`` (binary values, ``decode_responses`` off)."""

    def get(self, name: str) -> bytes | None: ...

    def set(self, name: str, value: bytes, ex: int | None = None) -> object: ...

    def close(self) -> None: ...


class RedisL2:
    """get / put of cached values by client key; never raises for Redis trouble (logs and skips instead).

    ``client`` (a ``redis.Redis`` or any other :class:`RedisClient`) is built from ``url`` when not given.
    Counters: ``hits``, ``misses``, ``errors``.
    """

    def __init__(self, url: str = "", ttl_seconds: int = 86400, *, client: RedisClient | None = None,
                 retry_after: float = 5.0, timeout: float = 2.0) -> None:
        if client is None:
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        self.client: RedisClient = client
        self.ttl_seconds = ttl_seconds
        self.retry_after = retry_after
        self.hits = self.misses = self.errors = 0
        self._down_until = 0.0
        self._lock = threading.Lock()

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, action: str, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            first = self._down_until == 0.0
            self._down_until = time.monotonic() + self.retry_after
        if first:
            log.warning("redis L2 unavailable (%s: %s); continuing without L2, retrying every %.0fs",
                        action, exc, self.retry_after)

    def _recovered(self) -> None:
        if self._down_until:
            with self._lock:
                self._down_until = 0.0
            log.info("redis L2 reachable again")

    def get(self, key: str, tenant: str) -> Embedding | TiledEmbedding | None:
        if not self._available():
            return None
        try:
            data = self.client.get(KEY_PREFIX + key)
        except Exception as exc:  # noqa: BLE001 - any Redis/network failure only disables L2
            self._failed("get", exc)
            return None
        self._recovered()
        value = None
        if data is not None:
            try:
                value = decode_entry(bytes(data), key, tenant)
            except ForeignEntry:
                pass
            except CorruptEntry as exc:
                log.error("ignoring L2 entry %s: %s", key[:16], exc)
        with self._lock:
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
        return value

    def put(self, key: str, tenant: str, value: Embedding | TiledEmbedding) -> None:
        if not self._available():
            return
        data = encode_entry(key, tenant, value)
        try:
            self.client.set(KEY_PREFIX + key, data, ex=self.ttl_seconds)
        except Exception as exc:  # noqa: BLE001
            self._failed("set", exc)
            return
        self._recovered()

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not fail shutdown
            log.debug("closing redis failed", exc_info=True)
