"""Test stand-ins for the Protocols of ``services`` (the one tests module mypy checks, see pyproject.toml).

Each fake is checked against its Protocol below (:func:`_as_embedding_source`, :data:`_REDIS_CLIENT`), so a
Protocol change that a fake does not follow fails ``mypy`` instead of drifting silently.
"""

from __future__ import annotations

import hashlib
import json

from sam_core.adapters.artifact import load_adapter
from sam_core.adapters.store import AdapterStore
from sam_core.errors import NotFound, Unavailable
from sam_core.inference.predictor import Predictor
from sam_core.inference.tiling import encode_tiled
from sam_core.io.images import decode_image
from sam_core.modeling.registry import LoadedModel
from services.common.embedding_codec import ServedEmbedding
from services.common.tiling import TilingRequest
from services.decoder.embeddings import CallOptions, EmbeddingSource
from services.encoder.l2 import RedisClient


class FakeEncoder:
    """In-process :class:`EmbeddingSource` standing in for the encoder service (keys by tenant + image +
    adapter + tiling); encodes with sam_core's Predictor. ``down`` makes every call fail UNAVAILABLE."""

    def __init__(self, model: LoadedModel, store: AdapterStore | None = None) -> None:
        self.model = model
        self.store = store
        self.values: dict[tuple[str, str], ServedEmbedding] = {}
        self.embeds: list[tuple[str, str]] = []  # (tenant, adapter) of every Embed
        self.gets = 0
        self.down = False
        self.calls: list[CallOptions] = []

    def _check(self, call: CallOptions) -> None:
        self.calls.append(call)
        if self.down:
            raise Unavailable("the encoder is unreachable")

    def _model_for(self, tenant: str, adapter: str) -> LoadedModel:
        if not adapter:
            return self.model
        if self.store is None:
            raise NotFound(f"adapter {adapter!r}: this FakeEncoder has no adapter store", field="adapter")
        return load_adapter(self.model, self.store.resolve(tenant, adapter).path)

    def embed(self, tenant: str, image: bytes, *, adapter: str, tiling: TilingRequest | None,
              call: CallOptions) -> str:
        self._check(call)
        self.embeds.append((tenant, adapter))
        key = hashlib.sha256(json.dumps([tenant, hashlib.sha256(image).hexdigest(), adapter,
                                         tiling and [tiling.tile_size, tiling.overlap]]).encode()).hexdigest()
        if (tenant, key) not in self.values:
            predictor = Predictor(self._model_for(tenant, adapter))
            canonical = decode_image(image)
            if tiling is None:
                self.values[(tenant, key)] = predictor.encode_one(canonical)
            else:
                self.values[(tenant, key)] = encode_tiled(predictor, canonical, tile_size=tiling.tile_size,
                                                          overlap=tiling.overlap)
        return key

    def get(self, tenant: str, key: str, *, call: CallOptions) -> ServedEmbedding:
        self._check(call)
        self.gets += 1
        if (tenant, key) not in self.values:
            raise NotFound(f"embedding {key} is not cached", field="key")
        return self.values[(tenant, key)]

    def forget(self) -> None:
        """An encoder restart: every key is gone."""
        self.values.clear()

    def close(self) -> None:
        pass


class FakeRedis:
    """In-memory :class:`RedisClient`; the tests' engines use the default TTL, which ``set`` checks."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, name: str) -> bytes | None:
        return self.data.get(name)

    def set(self, name: str, value: bytes, ex: int | None = None) -> None:
        assert ex == 86400
        self.data[name] = bytes(value)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ conformance, checked by mypy
def _as_embedding_source(fake: FakeEncoder) -> EmbeddingSource:
    return fake


_REDIS_CLIENT: RedisClient = FakeRedis()
