"""Typed Python client for the samforge services (embed, segment, train, watch, adapters).

    from services.client import SamforgeClient, BoxPrompt, PointPrompt

    with SamforgeClient(decoder="127.0.0.1:50052", encoder="127.0.0.1:50051", trainer="127.0.0.1:50053",
                        token="...") as client:
        key = client.embed(image_bytes).key
        result = client.segment(embedding_key=key, image=image_bytes,
                                prompts=[BoxPrompt(10, 20, 90, 120), PointPrompt([(50, 60, 1)])])
        result.masks[0].mask          # H x W bool, decoded from COCO RLE
        job = client.create_job(dataset="ships", method="decoder", adapter_name="ships", epochs=5)
        for event in client.watch_job(job.id): ...
        client.promote("ships", "prod", version=1)

gRPC errors surface as ``grpc.RpcError`` (``.code()``, ``.details()``) — the services map every bad input
to a precise status code. Deadlines: every call takes ``timeout`` (seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, TypeVar

import grpc
import numpy as np

from services._generated.sam.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

ENCODINGS = {"rle": decoder_pb2.MASK_ENCODING_RLE, "png": decoder_pb2.MASK_ENCODING_PNG,
             "polygons": decoder_pb2.MASK_ENCODING_POLYGONS, "none": decoder_pb2.MASK_ENCODING_NONE}
TERMINAL = {trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED,
            trainer_pb2.JOB_STATE_REJECTED}
StubT = TypeVar("StubT")

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11+, used only in annotations (never evaluated at run time)


class Hyperparameters(TypedDict, total=False):
    """The keyword arguments of :meth:`SamforgeClient.create_job`: the fields of ``sam.v1.Hyperparameters``."""

    epochs: int
    max_steps: int
    batch_size: int
    lr: float
    rank: int
    prompt: str  # "box" | "point" | "box+point"
    val_fraction: float
    seed: int
    bf16: bool
    patience: int
    crop: int
    warmup_steps: int
    checkpoint_every: int


@dataclass(frozen=True)
class BoxPrompt:
    x0: float
    y0: float
    x1: float
    y1: float
    points: tuple[tuple[float, float, int], ...] = ()  # optional extra (x, y, label) points


@dataclass(frozen=True)
class PointPrompt:
    points: Sequence[tuple[float, float, int]]  # (x, y, label): 1 foreground, 0 background


@dataclass
class MaskResult:
    iou_score: float
    stability_score: float
    area: int
    bbox: tuple[int, ...]
    height: int
    width: int
    rle_counts: str = ""
    png: bytes = b""
    polygons: list[list[float]] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        """H x W bool from whichever encoding was requested (RLE or PNG; polygons are rasterised)."""
        from sam_core.io.masks import decode_png, decode_rle, polygons_to_mask

        if self.rle_counts:
            return decode_rle({"size": [self.height, self.width], "counts": self.rle_counts})
        if self.png:
            return decode_png(self.png)
        if self.polygons:
            return polygons_to_mask(self.polygons, self.height, self.width)
        return np.zeros((self.height, self.width), bool)


@dataclass
class SegmentResult:
    masks: list[MaskResult]          # best mask per prompt (highest IoU score)
    all_masks: list[list[MaskResult]]  # every mask per prompt (3 with multimask)
    low_res_logits: list[np.ndarray | None]
    embedding_key: str
    model_id: str
    adapter: str
    re_embedded: bool
    decode_ms: float


def _prompt_message(prompt: BoxPrompt | PointPrompt) -> decoder_pb2.Prompt:
    message = decoder_pb2.Prompt()
    if isinstance(prompt, BoxPrompt):
        message.box.CopyFrom(decoder_pb2.Box(x0=prompt.x0, y0=prompt.y0, x1=prompt.x1, y1=prompt.y1))
    for x, y, label in prompt.points:
        message.points.append(decoder_pb2.Point(x=x, y=y, label=int(label)))
    return message


def _tensor(message: common_pb2.Tensor) -> np.ndarray | None:
    if not message.shape:
        return None
    return np.frombuffer(message.data, dtype=np.dtype(message.dtype).newbyteorder("<")).reshape(tuple(message.shape))


def _mask(message: decoder_pb2.Mask, size: Sequence[int]) -> MaskResult:
    return MaskResult(iou_score=message.iou_score, stability_score=message.stability_score, area=message.area,
                      bbox=tuple(message.bbox), height=int(size[0]), width=int(size[1]), rle_counts=message.rle_counts,
                      png=message.png, polygons=[list(p.xy) for p in message.polygons])


def _connected(stub: StubT | None, service: str) -> StubT:
    """``stub``, or ValueError when the client was made without that service's address."""
    if stub is None:
        raise ValueError(f"this SamforgeClient has no {service} address (pass {service}=host:port)")
    return stub


class SamforgeClient:
    """Channels to the services (any may be None if not used); bearer token and TLS optional."""

    def __init__(self, *, decoder: str | None = None, encoder: str | None = None, trainer: str | None = None,
                 token: str | None = None, root_certificates: bytes | str | Path | None = None,
                 tenant: str = "", max_message_bytes: int = 64 << 20) -> None:
        self.tenant = tenant
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if isinstance(root_certificates, (str, Path)):
            root_certificates = Path(root_certificates).read_bytes()
        self._channels: list[grpc.Channel] = []

        def channel(address: str | None) -> grpc.Channel | None:
            if address is None:
                return None
            if root_certificates is not None:
                ch = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options=options)
            else:
                ch = grpc.insecure_channel(address, options=options)
            self._channels.append(ch)
            return ch

        enc, dec, tr = channel(encoder), channel(decoder), channel(trainer)
        self.encoder = encoder_pb2_grpc.EncoderServiceStub(enc) if enc else None
        self.decoder = decoder_pb2_grpc.DecoderServiceStub(dec) if dec else None
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(tr) if tr else None
        self.registry = trainer_pb2_grpc.AdapterRegistryStub(tr) if tr else None

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> SamforgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- inference
    def embed(self, image: bytes, *, adapter: str = "", tile: bool = False, overlap: int = 0,
              timeout: float = 60.0) -> common_pb2.EmbeddingInfo:
        request = encoder_pb2.EmbedRequest(image=image, tenant=self.tenant, adapter=common_pb2.AdapterRef(ref=adapter),
                                           tiling=common_pb2.TilingOptions(enabled=tile, overlap=overlap))
        reply: encoder_pb2.EmbedResponse = _connected(self.encoder, "encoder").Embed(
            request, timeout=timeout, metadata=self._metadata)
        return reply.embedding

    def segment(self, prompts: Sequence[BoxPrompt | PointPrompt], *, image: bytes = b"", embedding_key: str = "",
                adapter: str = "", multimask: bool = False, encoding: str = "rle", threshold: float = 0.0,
                return_low_res_logits: bool = False, tile: bool = False, timeout: float = 60.0) -> SegmentResult:
        request = decoder_pb2.SegmentRequest(
            image=image, embedding_key=embedding_key, tenant=self.tenant,
            prompts=[_prompt_message(p) for p in prompts], multimask=multimask,
            adapter=common_pb2.AdapterRef(ref=adapter), encoding=ENCODINGS[encoding], threshold=threshold,
            return_low_res_logits=return_low_res_logits, tiling=common_pb2.TilingOptions(enabled=tile))
        reply: decoder_pb2.SegmentResponse = _connected(self.decoder, "decoder").Segment(
            request, timeout=timeout, metadata=self._metadata)
        all_masks = [[_mask(m, reply.image_size) for m in r.masks] for r in reply.results]
        best = [max(ms, key=lambda m: m.iou_score) for ms in all_masks]
        return SegmentResult(masks=best, all_masks=all_masks,
                             low_res_logits=[_tensor(r.low_res_logits) for r in reply.results],
                             embedding_key=reply.embedding_key, model_id=reply.model_id, adapter=reply.adapter,
                             re_embedded=reply.re_embedded, decode_ms=reply.decode_ms)

    # ----------------------------------------------------------------------------------- training
    def create_job(self, *, dataset: str, method: str = "decoder", adapter_name: str, promote_to: str = "",
                   allow_regression: bool = False, min_improvement: float = 0.0, timeout: float = 30.0,
                   **hyperparameters: Unpack[Hyperparameters]) -> trainer_pb2.Job:
        """Queue a job; it publishes only if it scores >= its champion + ``min_improvement`` on the name's
        held-out split, or with ``allow_regression`` (else it ends JOB_STATE_REJECTED)."""
        request = trainer_pb2.CreateJobRequest(tenant=self.tenant, dataset=dataset, method=method,
                                               hyperparameters=trainer_pb2.Hyperparameters(**hyperparameters),
                                               adapter_name=adapter_name, promote_to=promote_to,
                                               allow_regression=allow_regression, min_improvement=min_improvement)
        job: trainer_pb2.Job = _connected(self.trainer, "trainer").CreateJob(
            request, timeout=timeout, metadata=self._metadata)
        return job

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[trainer_pb2.JobEvent]:
        request = trainer_pb2.WatchJobRequest(id=job_id, tenant=self.tenant)
        events: Iterator[trainer_pb2.JobEvent] = _connected(self.trainer, "trainer").WatchJob(
            request, timeout=timeout, metadata=self._metadata)
        yield from events

    def wait_job(self, job_id: str, *, timeout: float | None = None,
                 on_event: Callable[[trainer_pb2.JobEvent], object] | None = None) -> trainer_pb2.Job:
        job: trainer_pb2.Job | None = None
        for event in self.watch_job(job_id, timeout=timeout):
            job = event.job
            if on_event:
                on_event(event)
            if job.state in TERMINAL:
                break
        if job is None:  # the trainer always sends the job's current state first
            raise RuntimeError(f"the trainer sent no event for job {job_id!r}")
        return job

    def cancel_job(self, job_id: str, *, timeout: float = 30.0) -> trainer_pb2.Job:
        job: trainer_pb2.Job = _connected(self.trainer, "trainer").CancelJob(
            trainer_pb2.CancelJobRequest(id=job_id, tenant=self.tenant), timeout=timeout, metadata=self._metadata)
        return job

    def list_jobs(self, *, timeout: float = 30.0) -> list[trainer_pb2.Job]:
        reply: trainer_pb2.ListJobsResponse = _connected(self.trainer, "trainer").ListJobs(
            trainer_pb2.ListJobsRequest(tenant=self.tenant), timeout=timeout, metadata=self._metadata)
        return list(reply.jobs)

    def upload_dataset(self, archive: str | Path, *, chunk_bytes: int = 1 << 20,
                       timeout: float = 600.0) -> trainer_pb2.DatasetRef:
        path = Path(archive)

        def chunks() -> Iterator[trainer_pb2.DatasetChunk]:
            with open(path, "rb") as handle:
                first = True
                while block := handle.read(chunk_bytes):
                    yield trainer_pb2.DatasetChunk(tenant=self.tenant if first else "",
                                                   filename=path.name if first else "", data=block)
                    first = False

        ref: trainer_pb2.DatasetRef = _connected(self.trainer, "trainer").UploadDataset(
            chunks(), timeout=timeout, metadata=self._metadata)
        return ref

    # ----------------------------------------------------------------------------------- adapters
    def list_adapters(self, name: str = "", *, timeout: float = 30.0) -> list[trainer_pb2.Adapter]:
        request = trainer_pb2.ListAdaptersRequest(tenant=self.tenant, name=name)
        reply: trainer_pb2.ListAdaptersResponse = _connected(self.registry, "trainer").ListAdapters(
            request, timeout=timeout, metadata=self._metadata)
        return list(reply.adapters)

    def get_adapter(self, ref: str, *, timeout: float = 30.0) -> trainer_pb2.Adapter:
        request = trainer_pb2.GetAdapterRequest(tenant=self.tenant, ref=ref)
        adapter: trainer_pb2.Adapter = _connected(self.registry, "trainer").GetAdapter(
            request, timeout=timeout, metadata=self._metadata)
        return adapter

    def promote(self, name: str, alias: str, version: int, *, force: bool = False,
                timeout: float = 30.0) -> trainer_pb2.Adapter:
        """Point ``name@alias`` at ``version``; ``force`` skips the held-out score check (FAILED_PRECONDITION)."""
        request = trainer_pb2.PromoteRequest(tenant=self.tenant, name=name, alias=alias, version=version, force=force)
        adapter: trainer_pb2.Adapter = _connected(self.registry, "trainer").Promote(
            request, timeout=timeout, metadata=self._metadata)
        return adapter

    def rollback(self, name: str, alias: str, *, timeout: float = 30.0) -> trainer_pb2.Adapter:
        request = trainer_pb2.RollbackRequest(tenant=self.tenant, name=name, alias=alias)
        adapter: trainer_pb2.Adapter = _connected(self.registry, "trainer").Rollback(
            request, timeout=timeout, metadata=self._metadata)
        return adapter

    def delete_adapter(self, name: str, version: int, *, timeout: float = 30.0) -> None:
        request = trainer_pb2.DeleteRequest(tenant=self.tenant, name=name, version=version)
        _connected(self.registry, "trainer").Delete(request, timeout=timeout, metadata=self._metadata)
