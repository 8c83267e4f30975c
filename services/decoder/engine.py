"""The decoder service's logic (no protobuf types): adapters, embeddings, batched decoding, mask encodings.

:meth:`DecoderEngine.segment` for one request (tenant already resolved):

1. cheap checks first: prompt count (more than ``SAMFORGE_MAX_PROMPTS`` is TooManyPrompts), prompt shapes,
   NaN / infinite values and labels (typed errors name the field, e.g. ``prompts[3].box``), threshold and
   encoding, so a bad request never costs an encoder call;
2. the adapter for the tenant (:class:`~services.decoder.adapters.DecoderAdapters`; unknown -> NOT_FOUND,
   invalid artifact -> FAILED_PRECONDITION while other versions keep serving);
3. the embedding (:class:`~services.decoder.embeddings.Embeddings`: local LRU, encoder, re-embed); an
   encoder-side adapter's embeddings are requested from the encoder with that exact adapter version;
4. the prompts validated against the image size, then decoded in chunks that bound the memory of the
   full-resolution masks (``PIXEL_BUDGET``), all prompts of a chunk in one batched call per prompt signature;
   tiled embeddings go through :func:`sam_core.inference.tiling.decode_tiled`. The model runs on the process's one
   compute thread (:mod:`services.common.compute`: one OpenMP team, not one per gRPC worker);
5. each mask encoded as requested, with its scores, area and box (:mod:`services.decoder.masks`).

:meth:`DecoderEngine.segment_everything` runs automatic mask generation (:mod:`sam_core.inference.automatic`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sam_core.adapters.factory import open_store
from sam_core.adapters.store import AdapterStore
from sam_core.errors import InvalidInput, InvalidMaskInput, TooManyPrompts
from sam_core.inference.automatic import EverythingOptions, generate
from sam_core.inference.prompts import Prompt, validate_prompts
from sam_core.inference.tiling import TiledEmbedding, decode_tiled
from sam_core.inference.types import DecodeResult, Embedding
from sam_core.modeling.registry import LoadedModel, load_model, resolve_device
from services.common import compute, metrics
from services.common.embedding_codec import ServedEmbedding
from services.common.memory import MemoryBudget, decoder_budget
from services.common.settings import DecoderSettings
from services.common.tiling import TilingRequest

from .adapters import DecoderAdapters, encoder_ref, served_ref
from .embeddings import CallOptions, Embeddings, EmbeddingSource
from .masks import MaskOut, check_encoding, describe, describe_batch
from .runtime import Runtime, select_runtime

log = logging.getLogger("samforge.decoder.engine")
PIXEL_BUDGET = 1 << 24  # mask pixels (x masks per prompt) decoded and post-processed at once
_ANY_SIZE = (math.inf, math.inf)  # pre-validation before the image size is known: skips the in-image check


@dataclass(frozen=True)
class PromptOutput:
    """One prompt's masks (1, or 3 with multimask) and its M x L x L low-res logits when requested."""

    masks: list[MaskOut]
    low_res_logits: np.ndarray | None = None


@dataclass(frozen=True)
class SegmentResult:
    """``adapter``: the "name:N" that decoded ("" = base); ``decode_ms``: decoding + mask encoding."""

    results: list[PromptOutput]
    image_size: tuple[int, int]
    embedding_key: str
    model_id: str
    adapter: str
    re_embedded: bool
    decode_ms: float


@dataclass(frozen=True)
class EverythingResult:
    masks: list[MaskOut]
    image_size: tuple[int, int]
    embedding_key: str
    decode_ms: float


class DecoderEngine:
    """Thread-safe decoder logic over one base model (see the module docstring)."""

    def __init__(self, model: LoadedModel, settings: DecoderSettings, source: EmbeddingSource, runtime: Runtime, *,
                 store: AdapterStore | None = None, watch_interval: float = 1.0) -> None:
        self.settings = settings
        self.runtime = runtime
        self.base = runtime.make(model)
        self.max_prompts = int(settings.max_prompts)
        self.adapters = DecoderAdapters(self.base, store, settings.adapter_cache, runtime.make,
                                        watch_interval=watch_interval)
        self.embeddings = Embeddings(source, settings.cache_bytes)
        self.compute = compute.shared()

    @property
    def model_id(self) -> str:
        return self.base.model_id

    # ------------------------------------------------------------------ Segment
    def segment(self, tenant: str, *, prompts: Sequence[Prompt], image: bytes = b"", embedding_key: str = "",
                multimask: bool = False, adapter: str = "", threshold: float = 0.0,
                tiling: TilingRequest | None = None, want_low_res: bool = False, encoding: str = "rle",
                call: CallOptions | None = None) -> SegmentResult:
        """Decode ``prompts`` against the image / key of the request (see the module docstring)."""
        count = len(prompts)
        if count > self.max_prompts:
            raise TooManyPrompts(f"{count} prompts in one call; the limit is {self.max_prompts}", field="prompts")
        prompts = validate_prompts(list(prompts), _ANY_SIZE, self.base.spec.low_res_size, self.max_prompts)
        if not math.isfinite(threshold):
            raise InvalidInput(f"must be a finite logit, got {threshold}", field="threshold")
        check_encoding(encoding)
        metrics.PROMPTS.observe(count)
        handle = self.adapters.resolve(tenant, adapter)
        fetched = self.embeddings.fetch(tenant, key=embedding_key, image=image, adapter=encoder_ref(handle),
                                        tiling=tiling, call=call)
        value = fetched.value
        if isinstance(value, TiledEmbedding):
            _check_tileable(prompts, want_low_res)
        predictor = self.adapters.predictor(handle)
        start = time.perf_counter()
        valid = validate_prompts(prompts, value.original_size, self.base.spec.low_res_size, self.max_prompts)
        outputs: list[PromptOutput] = []
        for chunk in _chunks(valid, value.original_size, 3 if multimask else 1):
            if isinstance(value, TiledEmbedding):
                result = self.compute.run(decode_tiled, predictor, value, chunk, multimask=multimask,
                                          threshold=threshold)
            else:
                result = self.compute.run(predictor.decode, value, chunk, multimask=multimask, threshold=threshold,
                                          return_low_res=want_low_res)
            outputs += _outputs(result, encoding)
        decode_ms = 1e3 * (time.perf_counter() - start)
        return SegmentResult(outputs, _height_width(value.original_size), fetched.key, self.model_id,
                             served_ref(handle), fetched.re_embedded, decode_ms)

    # ------------------------------------------------------------------ SegmentEverything
    def segment_everything(self, tenant: str, *, image: bytes = b"", embedding_key: str = "", adapter: str = "",
                           options: EverythingOptions | None = None, encoding: str = "rle",
                           call: CallOptions | None = None) -> EverythingResult:
        """Automatic masks on the request's embedding (a tiled one uses its whole-image embedding)."""
        resolved = (options or EverythingOptions()).resolved()
        check_encoding(encoding)
        handle = self.adapters.resolve(tenant, adapter)
        fetched = self.embeddings.fetch(tenant, key=embedding_key, image=image, adapter=encoder_ref(handle),
                                        call=call)
        embedding = _whole(fetched.value)
        predictor = self.adapters.predictor(handle)
        start = time.perf_counter()
        found = self.compute.run(generate, predictor, embedding, resolved)
        masks = [describe(found.masks[i], found.iou_scores[i], found.stability_scores[i], encoding)
                 for i in range(len(found.masks))]
        decode_ms = 1e3 * (time.perf_counter() - start)
        return EverythingResult(masks, _height_width(embedding.original_size), fetched.key, decode_ms)

    def close(self) -> None:
        """Stop the registry watch and close the encoder channel."""
        self.adapters.close()
        self.embeddings.close()


def _check_tileable(prompts: list[Prompt], want_low_res: bool) -> None:
    """What decode_tiled cannot do, refused before chunking (so errors name the request's prompt index)."""
    if want_low_res:
        raise InvalidInput("tiled embeddings have no single low-res frame; ask without tiling",
                           field="return_low_res_logits")
    for i, prompt in enumerate(prompts):
        if prompt.mask_input is not None:
            raise InvalidMaskInput("mask input is not supported with tiling", field=f"prompts[{i}].mask_input")


def _chunks(prompts: list[Prompt], size: tuple[int, int], masks_per_prompt: int) -> list[list[Prompt]]:
    """Consecutive chunks whose full-resolution masks stay within :data:`PIXEL_BUDGET` pixels."""
    per_prompt = masks_per_prompt * int(size[0]) * int(size[1])
    step = max(1, PIXEL_BUDGET // max(1, per_prompt))
    return [prompts[i:i + step] for i in range(0, len(prompts), step)]


def _outputs(result: DecodeResult, encoding: str) -> list[PromptOutput]:
    described = describe_batch(result.masks, result.iou_scores, result.stability_scores, encoding)
    low_res = result.low_res_logits
    return [PromptOutput(masks, None if low_res is None else np.ascontiguousarray(low_res[i], np.float32))
            for i, masks in enumerate(described)]


def _height_width(size: Sequence[int]) -> tuple[int, int]:
    """An embedding's (H, W) as a tuple (whatever sequence type it was built with)."""
    height, width = size
    return height, width


def _whole(value: ServedEmbedding) -> Embedding:
    return value.whole if isinstance(value, TiledEmbedding) else value


def memory_budget(settings: DecoderSettings, low_res_size: int) -> MemoryBudget:
    """What :mod:`services.common.memory` allows this decoder above its idle base."""
    return decoder_budget(cache_bytes=settings.cache_bytes, max_prompts=settings.max_prompts,
                          low_res_size=low_res_size, max_pixels=settings.max_pixels, pixel_budget=PIXEL_BUDGET,
                          workers=settings.workers, max_image_bytes=settings.max_image_bytes,
                          max_message_bytes=settings.max_message_bytes)


def build_engine(settings: DecoderSettings, source: EmbeddingSource) -> DecoderEngine:
    """Load the base model, pick the runtime (exporting the base decoder graph if needed), wire the registry."""
    device = resolve_device(settings.device)
    model = load_model(settings.model, settings.checkpoint or None, device=device)
    runtime = select_runtime(settings.runtime, device=device, max_prompts=settings.max_prompts,
                             cache_dir=settings.onnx_cache_dir, threads=settings.threads)
    store = open_store(settings.registry_url, settings.registry_dir, endpoint_url=settings.s3_endpoint_url)
    engine = DecoderEngine(model, settings, source, runtime, store=store)
    budget = memory_budget(settings, model.spec.low_res_size)
    metrics.MEMORY_BUDGET.set(budget.total)
    log.info("memory budget above the idle base: %s", budget.describe())
    log.info("decoder ready: model %s on %s, runtime %s, embedding cache %d bytes, <= %d prompts per call",
             engine.model_id, device, runtime.name, settings.cache_bytes, settings.max_prompts)
    return engine
