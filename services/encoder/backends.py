"""Encoder execution backends: what runs the base image encoder (``SAMFORGE_ENCODER_BACKEND``).

=========  ===================================================================================
torch      in-process PyTorch (default): BatchNorm folded, channels-last, bf16 with SAMFORGE_BF16
onnx       in-process ONNX Runtime over the encoder exported once into ``SAMFORGE_ONNX_CACHE_DIR``
triton     NVIDIA Triton Inference Server (``SAMFORGE_TRITON_URL``, model ``SAMFORGE_TRITON_MODEL``)
           through ``tritonclient.grpc.aio``: per-call deadline, retries with backoff on UNAVAILABLE
=========  ===================================================================================

A backend is only ``encode(batch) -> features`` (``B x 3 x S x S`` preprocessed float32 -> every feature
level of the model's family, ``B x C_l x h_l x w_l`` float32: the one tensor of a one-level model (SAM 1),
else ``{level: tensor}``, named as :func:`sam_core.export.onnx_encoder.encoder_output_names` names the
exported graph's outputs) for the *base* encoder, plugged into the base ``Predictor`` as ``encoder_fn``.
Keys, caches, single-flight, dynamic batching, tiling and adapter resolution are the same for all three.
``concurrency`` is how many batches the service keeps in flight: 1 for in-process backends (they use every
core), several for Triton, so that Triton's own dynamic batcher sees requests from every encoder replica
and batch slot at once.

Encoder-side adapters (LoRA / adapter / full): ``torch`` and ``onnx`` run them in-process with PyTorch.
``triton`` serves only the base encoder and refuses them with FAILED_PRECONDITION rather than silently
embedding with the base model (decoder-only adapters use base embeddings and work everywhere).

Errors from Triton become the service's typed errors: unreachable / not ready / deadline ->
:class:`Unavailable` (UNAVAILABLE), queue full -> :class:`Overloaded` (RESOURCE_EXHAUSTED), a model that
is missing or rejects the tensor layout -> :class:`ModelLoadError` (FAILED_PRECONDITION, a deployment
error naming ``SAMFORGE_TRITON_MODEL``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from sam_core.errors import AdapterInvalid, ModelLoadError, Overloaded, Unavailable
from sam_core.modeling.family import EncoderOutput
from sam_core.modeling.registry import LoadedModel

if TYPE_CHECKING:
    from tritonclient.grpc.aio import InferenceServerClient

    from services.common.settings import EncoderSettings

log = logging.getLogger("samforge.encoder.backends")
BACKENDS = ("torch", "onnx", "triton")
T = TypeVar("T")
TRITON_INPUT = "images"
TRITON_OUTPUT = "image_embeddings"  # a one-level model's output; multi-level models name each level
# Reconnect quickly once Triton is back (gRPC's default backoff grows to two minutes); spread calls over
# every address a dns:/// target resolves to (a headless Service: one per Triton pod).
TRITON_CHANNEL_ARGS = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30000),
]


@dataclass(frozen=True)
class EncoderBackend:
    """``encode`` None means the Predictor's own PyTorch encoder; ``concurrency`` batches in flight."""

    name: str
    encode: Callable[[torch.Tensor], EncoderOutput] | None = None
    concurrency: int = 1
    serves_encoder_adapters: bool = True
    close: Callable[[], None] = lambda: None

    def check_adapter(self, encoder_adapter: str | None, label: str) -> None:
        """Refuse an encoder-side adapter this backend cannot run (AdapterInvalid -> FAILED_PRECONDITION)."""
        if encoder_adapter is not None and not self.serves_encoder_adapters:
            raise AdapterInvalid(
                f"{label} changes the image encoder, and the {self.name} encoder backend serves only the base "
                "encoder; use a decoder-only adapter, or an encoder replica with SAMFORGE_ENCODER_BACKEND=torch",
                field="adapter")


class TritonEncoder:
    """Synchronous facade over ``tritonclient.grpc.aio`` (its own event-loop thread), safe across threads.

    ``outputs``: the model's output names -> per-image shape (C x h x w; None: not checked), in feature-level
    order; default the one output ``image_embeddings``. ``__call__``: B x 3 x S x S float32 -> that one
    B x C x h x w tensor, or ``{name: tensor}`` for several outputs (CPU float32, see :func:`triton_levels`).
    ``timeout_s`` bounds a whole call, retries included; UNAVAILABLE is retried ``retries`` times with
    exponential backoff from ``backoff_s``.
    """

    def __init__(self, url: str, model: str, *, version: str = "", timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.05, outputs: Mapping[str, tuple[int, ...] | None] | None = None) -> None:
        import tritonclient.grpc.aio as triton_aio  # extra "triton"; imported only when selected

        self._triton = triton_aio
        self.url, self.model, self.version = url, model, version
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.outputs = dict(outputs) if outputs else {TRITON_OUTPUT: None}
        self.calls = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="triton-client", daemon=True)
        self._thread.start()
        self._client = self._run(self._connect(), timeout=10.0)

    async def _connect(self) -> InferenceServerClient:
        client: InferenceServerClient = self._triton.InferenceServerClient(self.url, channel_args=TRITON_CHANNEL_ARGS)
        return client

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout + 1.0)
        except TimeoutError:
            future.cancel()
            raise Unavailable(f"Triton at {self.url} did not answer within {timeout:.0f} s") from None

    def __call__(self, batch: torch.Tensor) -> EncoderOutput:
        images = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        results = self._run(self._infer(images), timeout=self.timeout_s)
        levels = triton_levels(self.model, self.outputs, results, batch=len(images))
        return next(iter(levels.values())) if len(levels) == 1 else levels

    async def _infer(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            request = self._triton.InferInput(TRITON_INPUT, list(images.shape), "FP32")
            request.set_data_from_numpy(images)
            try:
                self.calls += 1
                result = await self._client.infer(
                    self.model, [request], model_version=self.version,
                    outputs=[self._triton.InferRequestedOutput(name) for name in self.outputs],
                    client_timeout=max(0.001, deadline - time.monotonic()))
                return {name: result.as_numpy(name) for name in self.outputs}
            except InferenceServerException as exc:
                status = str(exc.status() or "")
                pause = self.backoff_s * (2 ** attempt)
                if status.endswith("UNAVAILABLE") and attempt < self.retries and time.monotonic() + pause < deadline:
                    attempt += 1
                    await asyncio.sleep(pause)
                    continue
                raise self._typed(status, exc.message() or str(exc), attempt) from None

    def _typed(self, status: str, message: str, retries: int) -> Exception:
        where = f"Triton at {self.url} (model {self.model!r})"
        if status.endswith("RESOURCE_EXHAUSTED"):
            return Overloaded(f"{where} is overloaded: {message}")
        if status.endswith("DEADLINE_EXCEEDED"):
            return Unavailable(f"{where} did not answer within {self.timeout_s:g} s")
        if status.endswith(("NOT_FOUND", "INVALID_ARGUMENT")):
            return ModelLoadError(f"{where} cannot serve the image encoder: {message}", field="SAMFORGE_TRITON_MODEL")
        return Unavailable(f"{where} is unavailable after {retries + 1} attempt(s): {message}")

    def ready(self) -> bool:
        """Whether Triton reports the model ready (False when unreachable)."""
        try:
            return bool(self._run(self._client.is_model_ready(self.model, self.version, client_timeout=2.0), 2.0))
        except Exception:
            return False

    def close(self) -> None:
        try:
            self._run(self._client.close(), timeout=5.0)
        except Exception:  # closing a dead channel must not fail shutdown
            log.debug("closing the Triton client failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)


def triton_levels(model: str, outputs: Mapping[str, tuple[int, ...] | None],
                  results: Mapping[str, np.ndarray | None], batch: int) -> dict[str, torch.Tensor]:
    """Triton's reply -> ``{name: B x C x h x w tensor}`` in ``outputs`` order; a missing output or one of another
    shape than ``(batch, *outputs[name])`` is a deployment error (ModelLoadError naming SAMFORGE_TRITON_MODEL)."""
    levels: dict[str, torch.Tensor] = {}
    for name, shape in outputs.items():
        array = results.get(name)
        expected = (batch, *shape) if shape else (batch, "C", "h", "w")
        if array is None or array.ndim != 4 or array.shape[0] != batch or (shape and array.shape != expected):
            found = "nothing" if array is None else f"shape {array.shape}"
            raise ModelLoadError(f"Triton model {model!r} returned {found} for output {name!r}, expected {expected}",
                                 field="SAMFORGE_TRITON_MODEL")
        levels[name] = torch.from_numpy(array)
    return levels


def build_backend(settings: EncoderSettings, model: LoadedModel) -> EncoderBackend:
    """The backend ``settings.backend`` names, for ``model`` (the base model)."""
    name = settings.backend
    if name == "torch":
        return EncoderBackend("torch", concurrency=settings.batches_in_flight)
    if name == "onnx":
        from sam_core.export.onnx_encoder import cached_onnx_encoder

        start = time.perf_counter()
        encoder = cached_onnx_encoder(model, cache_dir=settings.onnx_cache_dir,
                                      threads=settings.threads or None)
        log.info("ONNX Runtime encoder %s (%.1f s)", encoder.path, time.perf_counter() - start)
        return EncoderBackend("onnx", encoder, concurrency=settings.batches_in_flight)
    if name == "triton":
        from sam_core.export.onnx_encoder import encoder_output_names

        spec = model.spec
        shapes = model.net.feature_shapes()  # C x h x w per level, named as the exported graph's outputs
        outputs: dict[str, tuple[int, ...] | None] = {
            output: shapes[level] for output, level in zip(encoder_output_names(model.net), model.net.feature_names,
                                                           strict=True)}
        client = TritonEncoder(settings.triton_url, settings.triton_model, version=settings.triton_model_version,
                               timeout_s=settings.triton_timeout_seconds, retries=settings.triton_retries,
                               outputs=outputs)
        if not client.ready():
            log.warning("Triton at %s does not report model %r ready yet; encodes fail UNAVAILABLE until it does",
                        settings.triton_url, settings.triton_model)
        log.info("Triton encoder backend: %s model %r (input %d px), %d batches in flight", settings.triton_url,
                 settings.triton_model, spec.img_size, settings.batches_in_flight)
        return EncoderBackend("triton", client, concurrency=settings.batches_in_flight,
                              serves_encoder_adapters=False, close=client.close)
    raise ValueError(f"unknown encoder backend {name!r}")  # settings validate the name first

