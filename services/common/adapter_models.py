"""Per-request adapter resolution and an LRU of loaded adapted models (vLLM ``lora/`` style).

Shared by both model services: the encoder uses :class:`AdapterModels` as is (encoder-side adapters), the
decoder subclasses it (:class:`services.decoder.adapters.DecoderAdapters`: every adapter has its own decoder).

:meth:`AdapterModels.resolve` turns ``(tenant, "name" | "name:3" | "name@prod")`` into a
:class:`ModelHandle`: the encoder-adapter id that goes into the embedding key and, for encoder-side
adapters, the registry version to encode with. No weights are loaded to resolve, so cache hits never
load an adapter:

* empty reference -> the base model;
* a decoder-only adapter (``shares_base_embeddings``) -> the base encoder and base key, nothing loaded;
* an encoder-side adapter (LoRA / adapter / full) -> its id from the checked ``adapter_config.json``;
  :meth:`AdapterModels.predictor` loads it on the first encode with ``load_adapter`` into an LRU of
  ``capacity`` models keyed by ``(tenant, name, version, sha256)`` that evicts *before* loading, so at
  most ``capacity`` adapter models are resident (plus one still referenced by an encode in flight).

Resolutions are cached and dropped whenever the registry's revision changes (``store.watch``), so alias
moves and new versions are served without a restart (within ``watch_interval`` seconds). The cheap
checks (registry content sha256, config, base model) run before anything is evicted, so an invalid
artifact raises :class:`~sam_core.errors.AdapterInvalid` while loaded versions keep serving.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sam_core.adapters.artifact import adapter_identity, check_base, load_adapter, read_adapter_config
from sam_core.adapters.store import AdapterRef, AdapterStore, AdapterVersion
from sam_core.errors import AdapterInvalid, NotFound
from sam_core.inference.predictor import Predictor
from sam_core.modeling.registry import LoadedModel
from sam_core.training.methods import get_method
from services.common import compute, metrics

log = logging.getLogger("samforge.adapters")
AdapterKey = tuple[str, str, int, str]  # (tenant, name, version, content sha256)
_MAX_IDENTITIES = 4096


@dataclass(frozen=True)
class ModelHandle:
    """What one request encodes with: ``adapter`` None means the base encoder.

    ``label`` is "base" or "tenant/name:version"; ``encoder_adapter`` is the id in the embedding key.
    """

    encoder_adapter: str | None
    label: str
    adapter: AdapterVersion | None = None


BASE = ModelHandle(None, "base")


def _key(version: AdapterVersion) -> AdapterKey:
    return (version.tenant, version.name, version.version, version.sha256)


class AdapterModels:
    """Resolve adapter references for tenants; hold at most ``capacity`` loaded encoder adapters."""

    def __init__(self, base: Predictor, store: AdapterStore | None, capacity: int,
                 make_predictor: Callable[[LoadedModel], Predictor], *, watch_interval: float = 1.0) -> None:
        self.base = base
        self.store = store
        self.capacity = max(1, int(capacity))
        self.make_predictor = make_predictor
        self.loads = 0
        self._models: OrderedDict[AdapterKey, tuple[str, Predictor]] = OrderedDict()  # key -> (label, predictor)
        self._identities: OrderedDict[AdapterKey, str] = OrderedDict()  # checked configs -> adapter id
        self._resolved: dict[tuple[str, str], AdapterVersion] = {}
        self._generation = 0  # bumped on every revision change: a resolution racing with it is not cached
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._stop_watch = store.watch(self._on_revision, interval=watch_interval) if store is not None else None

    # ------------------------------------------------------------------ resolution
    def resolve(self, tenant: str, ref: str) -> ModelHandle:
        """The handle serving ``ref`` for ``tenant`` (NotFound / InvalidInput / AdapterInvalid otherwise)."""
        if not ref:
            return BASE
        version = self._version(tenant, ref)
        if version.base_model_id != self.base.model_id:
            self._reject(f"adapter {version.ref!r} was trained on {version.base_model_id}, this encoder serves "
                         f"{self.base.model_id}")
        if version.shares_base_embeddings:
            return BASE
        return ModelHandle(self._identity(version), f"{version.tenant}/{version.ref}", version)

    def _on_revision(self, revision: int) -> None:
        with self._lock:
            self._resolved.clear()
            self._generation += 1
        log.info("adapter registry revision %d: cached resolutions dropped", revision)

    def _version(self, tenant: str, ref: str) -> AdapterVersion:
        with self._lock:
            found = self._resolved.get((tenant, ref))
            generation = self._generation
        if found is not None:
            return found
        if self.store is None:
            raise NotFound(f"adapter {ref!r} not found (no adapter registry configured)", field="adapter")
        version = self.store.resolve(tenant, AdapterRef.parse(ref))
        with self._lock:
            if generation == self._generation:
                self._resolved[(tenant, ref)] = version
        return version

    def _identity(self, version: AdapterVersion) -> str:
        """The encoder-adapter id of ``version`` from its checked config (cached: versions are immutable)."""
        key = _key(version)
        with self._lock:
            found = self._identities.get(key)
        if found is not None:
            return found
        try:
            config = read_adapter_config(version.path)
            if get_method(config.method).one_shot:
                raise AdapterInvalid(f"a one-shot {config.method} artifact has no image-encoder weights",
                                     field="adapter")
            check_base(config, self.base.model, version.ref)
        except (AdapterInvalid, NotFound) as exc:
            self._reject(f"adapter {version.ref!r}: {exc.detail}")
        identity = adapter_identity(config)
        with self._lock:
            self._identities[key] = identity
            while len(self._identities) > _MAX_IDENTITIES:
                self._identities.popitem(last=False)
        return identity

    def _reject(self, message: str) -> None:
        metrics.ADAPTER_LOAD_FAILURES.inc()
        raise AdapterInvalid(message, field="adapter")

    # ------------------------------------------------------------------ LRU of loaded models
    def predictor(self, handle: ModelHandle) -> Predictor:
        """The predictor that encodes for ``handle`` (loads its adapter into the LRU when needed)."""
        if handle.adapter is None:
            return self.base
        key = _key(handle.adapter)
        found = self._touch(key)
        if found is not None:
            return found
        with self._load_lock:  # one load at a time; a concurrent request for the same adapter reuses it
            found = self._touch(key)
            if found is not None:
                return found
            self._identity(handle.adapter)  # cheap checks again (cache) before anything is evicted
            self._evict_for_one()
            try:  # on the process's compute thread: the loading's tensor ops must not start another OpenMP team
                model, predictor = compute.shared().run(self._load, handle.adapter)
            except AdapterInvalid:
                metrics.ADAPTER_LOAD_FAILURES.inc()
                raise
            with self._lock:
                self._models[key] = (handle.label, predictor)
                self.loads += 1
                metrics.LOADED_ADAPTERS.set(len(self._models))
            log.info("loaded encoder adapter %s (%s)", handle.label, model.encoder_adapter_id)
            return predictor

    def _load(self, version: AdapterVersion) -> tuple[LoadedModel, Predictor]:
        model = load_adapter(self.base.model, version.path)
        return model, self.make_predictor(model)

    def _touch(self, key: AdapterKey) -> Predictor | None:
        with self._lock:
            entry = self._models.get(key)
            if entry is None:
                return None
            self._models.move_to_end(key)
            return entry[1]

    def _evict_for_one(self) -> None:
        with self._lock:
            while len(self._models) >= self.capacity:
                _, (label, _) = self._models.popitem(last=False)
                log.info("evicted encoder adapter %s", label)
            metrics.LOADED_ADAPTERS.set(len(self._models))

    def loaded(self, tenant: str | None = None) -> list[str]:
        """Labels of the loaded encoder adapters (only ``tenant``'s when given), least recently used first."""
        with self._lock:
            return [label for key, (label, _) in self._models.items() if tenant is None or key[0] == tenant]

    def close(self) -> None:
        if self._stop_watch is not None:
            self._stop_watch()
            self._stop_watch = None
