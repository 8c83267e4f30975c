"""Batched predictor: encode images once, decode many prompts per call.

Follows segment-anything's ``SamPredictor`` (same prompt-encoder / mask-decoder calls, same mask
post-processing) but is stateless: :meth:`Predictor.encode` (= :meth:`Predictor.prepare`, the resize, then
:meth:`Predictor.encode_prepared`, the encoder call) returns :class:`Embedding` objects that
carry their identity (model id, preprocessing version, sizes), and :meth:`Predictor.decode` takes an
embedding plus N prompts and returns N results. Prompts are grouped by signature (box?, number of
points, mask input?) so each group is one batched decoder call whose outputs equal single decodes:
no padding points are ever added beyond the one ``PromptEncoder`` itself adds for point-only prompts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sam_core.errors import InvalidInput
from sam_core.inference.postprocess import stability_score
from sam_core.inference.prompts import DEFAULT_MAX_PROMPTS, Prompt, all_present, validate_prompts
from sam_core.inference.types import DecodeResult, Embedding
from sam_core.modeling.family import EncoderOutput, Features, PromptBatch
from sam_core.modeling.preprocess import model_input, resize_image, transform_boxes, transform_coords, upscale_logits
from sam_core.modeling.registry import LoadedModel

DEFAULT_DECODE_BATCH = 64


@dataclass(frozen=True)
class PreparedImage:
    """An image resized for one model (:meth:`Predictor.prepare`): ``resized`` h x w x 3 uint8 with
    max(h, w) == img_size, and the (H, W) of the image it came from. It holds at most img_size^2 x 3 bytes
    whatever the original size."""

    resized: np.ndarray
    original_size: tuple[int, int]

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.resized.shape[0]), int(self.resized.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.resized.nbytes)


class Predictor:
    """Encode / decode with one loaded model on one device, through its family's interface.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the image encoder under autocast; embeddings
    are always returned as float32. The decoder runs in float32, through the family's fast decoder (SAM 1:
    the re-associated :class:`~sam_core.modeling.fast_decoder.FastMaskDecoder`) unless ``fast_decoder=False``
    (the eager decoder; both give the same logits to float32 rounding). The image encoder runs as the
    family's optimised inference encoder (SAM 1: BatchNorm folded, channels-last; a snapshot of the weights
    taken at the first encode, so a decode-only predictor never copies the encoder) unless
    ``optimize_encoder=False``. ``encoder_fn`` replaces the image encoder with another runtime of the same
    weights (``B x 3 x S x S ->`` one tensor per feature level in ``feature_names`` order, e.g. ONNX Runtime
    or a Triton client); ``autocast_dtype`` and ``optimize_encoder`` then do not apply to the encoder.
    """

    def __init__(self, model: LoadedModel, *, device: str | torch.device | None = None,
                 max_prompts: int = DEFAULT_MAX_PROMPTS, decode_batch: int = DEFAULT_DECODE_BATCH,
                 autocast_dtype: torch.dtype | None = None, fast_decoder: bool = True,
                 optimize_encoder: bool = True,
                 encoder_fn: Callable[[torch.Tensor], EncoderOutput] | None = None) -> None:
        self.model = model
        self.net = model.net
        self.spec = model.spec
        self.device = torch.device(device) if device is not None else next(self.net.parameters()).device
        self.net.to(self.device).eval()
        self.max_prompts = max_prompts
        self.decode_batch = decode_batch
        self.autocast_dtype = autocast_dtype
        self.decoding = self.net.mask_decoding(fast=fast_decoder)
        self._optimize_encoder = optimize_encoder
        self._encoder: torch.nn.Module | None = None
        self._channels_last = False
        self.encoder_fn = encoder_fn

    @property
    def model_id(self) -> str:
        return self.model.model_id

    # ------------------------------------------------------------------ encode
    @property
    def encoder(self) -> torch.nn.Module:
        """The module :meth:`encode_tensor` runs (built on first use; a race builds it twice, harmlessly)."""
        if self._encoder is None:
            self._encoder = self.net.inference_encoder(self._optimize_encoder)
            # a rewritten copy runs its convolutions channels-last; the plain encoder keeps its input layout
            self._channels_last = self._encoder is not self.net.inference_encoder(optimize=False)
        return self._encoder

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def encode_tensor(self, batch: torch.Tensor) -> Features:
        """B x 3 x S x S preprocessed input -> named float32 features (name -> B x C_l x h_l x w_l)."""
        if self.encoder_fn is not None:
            output = self.encoder_fn(batch.float())
        else:
            batch = batch.to(self.device)
            encoder = self.encoder
            if self._channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                output = encoder(batch)
        features = self.net.features_from_encoder(output)
        return {name: t.to(self.device, torch.float32) for name, t in features.items()}

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """A canonical image (H x W x 3 uint8 RGB) resized for this model: what :meth:`encode_prepared` takes."""
        return PreparedImage(resize_image(image, self.spec), (int(image.shape[0]), int(image.shape[1])))

    def encode_prepared(self, prepared: Sequence[PreparedImage]) -> list[Embedding]:
        """Encode prepared images in one encoder call (a batch of ``len(prepared)``).

        Embeddings record the encoder adapter (None for the base model and decoder-only adapters).
        """
        features = self.encode_tensor(torch.cat([model_input(p.resized, self.spec) for p in prepared]))
        return [Embedding(features={name: t[i:i + 1].cpu() for name, t in features.items()},
                          original_size=p.original_size, input_size=p.input_size,
                          model_id=self.model_id, preprocess_version=self.spec.preprocess_version,
                          encoder_adapter=self.model.encoder_adapter_id)
                for i, p in enumerate(prepared)]

    def encode(self, images: Sequence[np.ndarray], *, batch_size: int = 1) -> list[Embedding]:
        """Encode canonical images (each H x W x 3 uint8 RGB), ``batch_size`` per encoder call."""
        embeddings: list[Embedding] = []
        for start in range(0, len(images), batch_size):
            embeddings += self.encode_prepared([self.prepare(img) for img in images[start:start + batch_size]])
        return embeddings

    def encode_one(self, image: np.ndarray) -> Embedding:
        return self.encode([image])[0]

    # ------------------------------------------------------------------ decode
    def check_embedding(self, embedding: Embedding) -> None:
        """Refuse an embedding computed by another model or preprocessing version."""
        theirs = (embedding.model_id, embedding.preprocess_version, embedding.encoder_adapter)
        ours = (self.model_id, self.spec.preprocess_version, self.model.encoder_adapter_id)
        if theirs != ours:
            raise InvalidInput(
                f"embedding was computed by {'/'.join(map(str, theirs))}, this predictor is {'/'.join(map(str, ours))}",
                field="embedding",
            )

    def prompt_batch(self, prompts: Sequence[Prompt], original_size: tuple[int, int]) -> PromptBatch:
        """Validated prompts of one signature -> tensors in the model's input frame on this device."""
        size = self.spec.img_size
        first = prompts[0]
        points = boxes = masks = None
        if first.point_coords is not None:
            coords = [transform_coords(c, original_size, size) for c in all_present(p.point_coords for p in prompts)]
            points = (torch.as_tensor(np.stack(coords), dtype=torch.float, device=self.device),
                      torch.as_tensor(np.stack(all_present(p.point_labels for p in prompts)), dtype=torch.int,
                                      device=self.device))
        if first.box is not None:
            box_array = transform_boxes(np.stack(all_present(p.box for p in prompts)), original_size, size)
            boxes = torch.as_tensor(box_array, dtype=torch.float, device=self.device)
        if first.mask_input is not None:
            masks = torch.as_tensor(np.stack(all_present(p.mask_input for p in prompts)), dtype=torch.float,
                                    device=self.device)
        return PromptBatch(points=points, boxes=boxes, masks=masks)

    @torch.inference_mode()
    def decode_low_res(self, features: Features, prompts: Sequence[Prompt], original_size: tuple[int, int],
                       multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated prompts -> (N x M x L x L low-res logits, N x M IoU) in input order.

        features: one image's named features (1 x C_l x h_l x w_l each). Groups prompts by signature and
        decodes each group in chunks of ``decode_batch``.
        """
        named = {name: t.to(self.device) for name, t in features.items()}
        groups: dict[tuple[bool, int, bool], list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt.signature(), []).append(i)
        m = self.net.num_multimask_outputs if multimask else 1
        low_side = self.spec.low_res_size
        low_res = torch.empty((len(prompts), m, low_side, low_side), device=self.device)
        iou = torch.empty((len(prompts), m), device=self.device)
        for indices in groups.values():
            for start in range(0, len(indices), self.decode_batch):
                chunk = indices[start:start + self.decode_batch]
                batch = self.prompt_batch([prompts[i] for i in chunk], original_size)
                lr, sc = self.decoding(named, batch, multimask)
                index = torch.as_tensor(chunk, device=self.device)
                low_res[index] = lr
                iou[index] = sc
        return low_res, iou

    def upscale(self, low_res: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """N x M x L x L -> N x M x H x W logits in the embedding's original frame."""
        return upscale_logits(low_res, self.spec.img_size, embedding.input_size, embedding.original_size)

    @torch.inference_mode()
    def postprocess(self, low_res: torch.Tensor, embedding: Embedding, threshold: float, masks: np.ndarray,
                    stability: torch.Tensor) -> None:
        """Fill ``masks`` (N x M x H x W bool) and ``stability`` (N x M float32, CPU) from N x M x L x L logits.

        On CPU (float32) one prompt at a time: its M x H x W logits stay in cache for the three
        thresholded passes, and the mask is written straight into ``masks`` (no bool temporary, no
        copy). Elsewhere ``decode_batch`` prompts at a time, copied back to the host.
        """
        on_cpu = low_res.device.type == "cpu" and low_res.dtype == torch.float32
        out = torch.from_numpy(masks)
        step = 1 if on_cpu else self.decode_batch
        for start in range(0, len(low_res), step):
            logits = self.upscale(low_res[start:start + step], embedding)
            stop = start + len(logits)
            if on_cpu:  # NumPy's float32 comparison: same result as torch.gt, about 2x faster here
                np.greater(logits.numpy(), np.float32(threshold), out=masks[start:stop])
            else:
                out[start:stop] = (logits > threshold).cpu()
            stability[start:stop] = stability_score(logits, threshold).cpu()

    def decode(self, embedding: Embedding, prompts: Sequence[Prompt], *, multimask: bool = False,
               threshold: float = 0.0, return_low_res: bool = True) -> DecodeResult:
        """Decode N prompts against one embedding.

        ``threshold`` is in logit space (0.0 = probability 0.5, SAM's ``mask_threshold``).
        Masks are post-processed ``decode_batch`` prompts at a time so memory stays bounded by
        decode_batch x M x H x W floats however many prompts arrive.
        """
        self.check_embedding(embedding)
        valid = validate_prompts(prompts, embedding.original_size, self.spec.low_res_size, self.max_prompts)
        t0 = time.perf_counter()
        low_res, iou = self.decode_low_res(embedding.features, valid, embedding.original_size, multimask)
        t1 = time.perf_counter()
        h, w = embedding.original_size
        masks = np.empty((len(valid), low_res.shape[1], h, w), dtype=bool)
        stability = torch.empty(iou.shape)
        self.postprocess(low_res, embedding, threshold, masks, stability)
        t2 = time.perf_counter()
        return DecodeResult(
            masks=masks,
            iou_scores=iou.float().cpu().numpy(),
            stability_scores=stability.numpy(),
            low_res_logits=low_res.float().cpu().numpy() if return_low_res else None,
            timings_ms={"decode": 1e3 * (t1 - t0), "postprocess": 1e3 * (t2 - t1)},
        )
