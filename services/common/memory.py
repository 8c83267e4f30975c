"""Memory a service may hold above its idle base, from its settings: the one place for that arithmetic.

The idle base is the process's resident memory once it reports SERVING (interpreter, libraries, weights, the
start-up encode below). Each service exports its budget as the gauge ``samforge_memory_budget_bytes`` and
``deploy/README.md`` derives a pod memory limit from it: limit >= idle base + budget.

Encoder (:func:`encoder_budget`), the sum of

- ``cache``: ``SAMFORGE_CACHE_BYTES``, the L1 embeddings (counted on CPU only: on CUDA they are GPU memory);
- ``queue``: ``SAMFORGE_QUEUE_BYTES``, images the batcher holds, queued or being encoded (resized to the model's
  input, tiled jobs at full size; see :mod:`services.encoder.batcher`);
- ``encode``: ``SAMFORGE_ENCODER_CONCURRENCY`` batches x ``SAMFORGE_MAX_BATCH`` x one image's encoder working
  set. In-process backends (torch, onnx) *measure* the working set once at start-up
  (:func:`measure_encode_bytes`: the rise of peak RSS over encoding one dummy image, ``/proc/self/clear_refs``
  then ``VmHWM``), because activation memory depends on the runtime, its kernels and the allocator, which no
  spec describes. Activations grow linearly with the batch, so B x one image over-counts the fixed part of a
  batch-of-B call (LiteMedSAM here: one image 220 MB on the first encode, a batch of 4 measured 671 MB). The
  triton backend's activations live in Triton: its working set is the batch's input and output tensors,
  *estimated* from the model's spec (:func:`transfer_bytes`);
- ``requests``: ``SAMFORGE_WORKERS`` x 2 x ``SAMFORGE_MAX_IMAGE_BYTES``: each gRPC worker thread may hold one
  request's message and its image bytes;
- ``decode``: ``SAMFORGE_DECODE_BYTES``, images being decoded (PIL's buffer, the canonical RGB array, inflate
  buffers: :data:`DECODE_BYTES_PER_PIXEL` a pixel) until the request thread has turned them into the queued form.
  A :class:`~services.common.byte_semaphore.ByteSemaphore` bounds them (:mod:`services.encoder.engine`); the
  setting must hold one image of ``SAMFORGE_MAX_PIXELS``.

:func:`encoder_settings_budget` derives every term from the settings and one image's working set (what the
encoder exports and what the deploy tests check pod limits against).

Decoder (:func:`decoder_budget`): ``SAMFORGE_DECODER_CACHE_BYTES`` + one call's working set (calls run one at a
time on the compute thread: the low-res logits of ``SAMFORGE_MAX_PROMPTS`` prompts x 3 masks, one chunk of
boolean full-resolution masks and one prompt's float32 full-resolution logits, for an image of
``SAMFORGE_MAX_PIXELS``) + ``SAMFORGE_WORKERS`` x (``SAMFORGE_MAX_IMAGE_BYTES`` + ``SAMFORGE_MAX_MESSAGE_BYTES``):
each worker's request image and its reply. An estimate from the shapes, not a measurement. The decoder never
decodes images (it hashes the request's bytes and forwards them to the encoder's ``Embed``): no decode term.

glibc's malloc keeps one arena per thread that allocates (up to 8 x cores) and returns little of it; the
measured effect of ``MALLOC_ARENA_MAX`` on the encoder under load is in ``deploy/README.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.settings import EncoderSettings

DECODE_BYTES_PER_PIXEL = 10
"""Peak bytes per pixel while decoding an image (measured: a 6 Mpx PNG raised peak RSS by 62 MB)."""
MULTIMASK = 3
"""Masks per prompt with multimask output (the most a Segment call returns per prompt)."""
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes a service may hold above its idle base, by term (see the module docstring)."""

    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def describe(self) -> str:
        return " + ".join(f"{name} {value / (1 << 20):.0f} MiB" for name, value in self.terms.items()) + \
            f" = {self.total / (1 << 20):.0f} MiB"


def encoder_budget(*, cache_bytes: int, queue_bytes: int, max_batch: int, concurrency: int,
                   encode_bytes_per_image: int, workers: int, max_image_bytes: int, decode_bytes: int,
                   cache_on_host: bool = True) -> MemoryBudget:
    """The encoder's budget from its settings and one image's measured (or estimated) encoder working set."""
    return MemoryBudget({
        "cache": cache_bytes if cache_on_host else 0,
        "queue": queue_bytes,
        "encode": concurrency * max_batch * encode_bytes_per_image,
        "requests": workers * 2 * max_image_bytes,
        "decode": decode_bytes,
    })


def encoder_settings_budget(settings: EncoderSettings, *, encode_bytes_per_image: int,
                            cache_on_host: bool = True) -> MemoryBudget:
    """:func:`encoder_budget` with every term but one image's encoder working set read from ``settings``."""
    return encoder_budget(cache_bytes=settings.cache_bytes, queue_bytes=settings.queue_bytes,
                          max_batch=settings.max_batch, concurrency=settings.batches_in_flight,
                          encode_bytes_per_image=encode_bytes_per_image, workers=settings.workers,
                          max_image_bytes=settings.max_image_bytes, decode_bytes=settings.decode_bytes,
                          cache_on_host=cache_on_host)


def decoder_budget(*, cache_bytes: int, max_prompts: int, low_res_size: int, max_pixels: int, pixel_budget: int,
                   workers: int, max_image_bytes: int, max_message_bytes: int) -> MemoryBudget:
    """The decoder's budget: its embedding cache, one call's working set, the workers' requests and replies."""
    low_res = max_prompts * MULTIMASK * low_res_size * low_res_size * 4
    masks = max(pixel_budget, MULTIMASK * max_pixels)  # one chunk of bool masks (at least one prompt)
    logits = MULTIMASK * max_pixels * 4  # one prompt's float32 logits at full resolution
    return MemoryBudget({
        "cache": cache_bytes,
        "decode": low_res + masks + logits,
        "requests": workers * (max_image_bytes + max_message_bytes),
    })


def transfer_bytes(img_size: int, feature_shapes: Iterable[tuple[int, ...]]) -> int:
    """One image's encoder input (3 x S x S float32) and features (every level, C x h x w float32), each held
    twice (the tensor and its wire copy): a remote encoder's working set per image."""
    features = sum(4 * math.prod(shape) for shape in feature_shapes)
    return 2 * (3 * img_size * img_size * 4 + features)


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in {_STATUS}")
    return int(match.group(1)) * 1024


def measure_encode_bytes(encode_once: Callable[[], object]) -> int | None:
    """The rise of this process's peak RSS while ``encode_once()`` runs, or None where Linux's peak-RSS reset
    (``/proc/self/clear_refs``, Linux >= 4.0) is not available."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_bytes("VmRSS")
    except OSError:
        return None
    encode_once()
    return max(0, _status_bytes("VmHWM") - before)
