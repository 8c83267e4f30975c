"""The bad-input corpus: for every RPC of the three services, requests a client can send by mistake or on purpose,
each with the status code it must get and the text its message must contain (the field, usually).

A :class:`Case`'s request is a message, a list of messages (a client stream) or a function of
:class:`~tests.reliability.conftest.Owned` (requests that name tenant acme's key, job or upload). Every request is
sent with tenant acme's token unless the case gives other metadata. None of these requests may change state.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from services._generated.sam.v1 import common_pb2, decoder_pb2, encoder_pb2, trainer_pb2
from tests.conftest import noise_png, png_bytes, png_header_only, tar_bytes
from tests.reliability.harness import AS_A, MIB

Code = grpc.StatusCode
NO_TOKEN: tuple[tuple[str, str], ...] = ()
BAD_TOKEN = (("authorization", "Bearer not-a-token"),)
IMAGE = noise_png(1)  # tenant acme's embedded image (Owned.key)
FLAT_1000 = png_bytes(np.zeros((1000, 1000, 3), np.uint8))  # small file, many tiles


@dataclass(frozen=True)
class Case:
    name: str
    rpc: str
    request: Any
    code: grpc.StatusCode
    needle: str = ""
    metadata: tuple[tuple[str, str], ...] = AS_A


def _ref(ref: str) -> common_pb2.AdapterRef:
    return common_pb2.AdapterRef(ref=ref)


def _tiling(tile_size: int = 0, overlap: int = 0) -> common_pb2.TilingOptions:
    return common_pb2.TilingOptions(enabled=True, tile_size=tile_size, overlap=overlap)


def _box(x0: float = 2, y0: float = 2, x1: float = 30, y1: float = 30) -> decoder_pb2.Prompt:
    return decoder_pb2.Prompt(box=decoder_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1))


def _points(*xyl: tuple[float, float, int]) -> decoder_pb2.Prompt:
    return decoder_pb2.Prompt(points=[decoder_pb2.Point(x=x, y=y, label=label) for x, y, label in xyl])


def _mask(dtype: str = "float32", shape: tuple[int, ...] = (1, 8, 8), nbytes: int | None = None) -> decoder_pb2.Prompt:
    size = 4 * int(np.prod(shape, dtype=np.float64)) if nbytes is None else nbytes
    tensor = common_pb2.Tensor(dtype=dtype, shape=list(shape), data=bytes(min(size, 1 << 16)))
    return decoder_pb2.Prompt(box=_box().box, mask_input=tensor)


def _segment(*prompts: decoder_pb2.Prompt, **fields: Any) -> decoder_pb2.SegmentRequest:
    fields.setdefault("image", IMAGE)
    return decoder_pb2.SegmentRequest(prompts=list(prompts) or [_box()], **fields)


def _everything(**fields: Any) -> decoder_pb2.SegmentEverythingRequest:
    fields = {"image": IMAGE, "points_per_side": 2, **fields}
    return decoder_pb2.SegmentEverythingRequest(**fields)


def _job(**fields: Any) -> trainer_pb2.CreateJobRequest:
    request = {"dataset": "empty", "method": "decoder", "adapter_name": "fuzzed", **fields}
    return trainer_pb2.CreateJobRequest(**request)


def _hp(**fields: Any) -> trainer_pb2.CreateJobRequest:
    return _job(hyperparameters=trainer_pb2.Hyperparameters(**fields))


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _bomb(kind: str, nbytes: int = 8 * MIB) -> bytes:
    """A small archive of ``nbytes`` zeros (compresses about 1000:1): past the suite's extraction ratio limit."""
    if kind == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("images/zeros.bin", bytes(nbytes))
        return buffer.getvalue()
    return tar_bytes({"images/zeros.bin": bytes(nbytes)})


def _upload(payload: bytes, filename: str = "data.tar.gz", tenant: str = "") -> list[trainer_pb2.DatasetChunk]:
    step = 256 << 10
    first = [trainer_pb2.DatasetChunk(tenant=tenant, filename=filename, data=payload[:step])]
    return first + [trainer_pb2.DatasetChunk(data=payload[i:i + step]) for i in range(step, len(payload), step)]


PNG = IMAGE
ENCODER_CASES = [
    Case("embed: empty image", "Embed", encoder_pb2.EmbedRequest(), Code.INVALID_ARGUMENT, "image"),
    Case("embed: garbage bytes", "Embed", encoder_pb2.EmbedRequest(image=b"\x00garbage" * 50), Code.INVALID_ARGUMENT,
         "image"),
    Case("embed: truncated PNG", "Embed", encoder_pb2.EmbedRequest(image=PNG[: len(PNG) // 2]), Code.INVALID_ARGUMENT,
         "image"),
    Case("embed: PNG signature only", "Embed", encoder_pb2.EmbedRequest(image=PNG[:8]), Code.INVALID_ARGUMENT, "image"),
    Case("embed: 0x0 header", "Embed", encoder_pb2.EmbedRequest(image=png_header_only(0, 0)), Code.INVALID_ARGUMENT,
         "image"),
    Case("embed: 100000x100000 header", "Embed", encoder_pb2.EmbedRequest(image=png_header_only(100000, 100000)),
         Code.INVALID_ARGUMENT, "image"),
    Case("embed: 2^31-1 x 1 header", "Embed", encoder_pb2.EmbedRequest(image=png_header_only(2**31 - 1, 1)),
         Code.INVALID_ARGUMENT, "image"),
    Case("embed: over the image byte limit", "Embed", encoder_pb2.EmbedRequest(image=PNG + bytes(3 * MIB)),
         Code.INVALID_ARGUMENT, "image"),
    Case("embed: over the message limit", "Embed", encoder_pb2.EmbedRequest(image=bytes(9 * MIB)),
         Code.RESOURCE_EXHAUSTED),
    Case("embed: unknown adapter", "Embed", encoder_pb2.EmbedRequest(image=PNG, adapter=_ref("nope")), Code.NOT_FOUND,
         "adapter"),
    Case("embed: unknown version", "Embed", encoder_pb2.EmbedRequest(image=PNG, adapter=_ref("ships:99")),
         Code.NOT_FOUND, "adapter"),
    Case("embed: traversal adapter", "Embed", encoder_pb2.EmbedRequest(image=PNG, adapter=_ref("../../etc/passwd")),
         Code.INVALID_ARGUMENT, "adapter"),
    Case("embed: version 0", "Embed", encoder_pb2.EmbedRequest(image=PNG, adapter=_ref("ships:0")),
         Code.INVALID_ARGUMENT, "adapter"),
    Case("embed: version and alias", "Embed", encoder_pb2.EmbedRequest(image=PNG, adapter=_ref("ships:1@prod")),
         Code.INVALID_ARGUMENT, "adapter"),
    Case("embed: corrupt adapter", "Embed", encoder_pb2.EmbedRequest(image=PNG, adapter=_ref("broken")),
         Code.FAILED_PRECONDITION, "adapter"),
    Case("embed: negative tile size", "Embed", encoder_pb2.EmbedRequest(image=PNG, tiling=_tiling(-1)),
         Code.INVALID_ARGUMENT, "tiling.tile_size"),
    Case("embed: negative overlap", "Embed", encoder_pb2.EmbedRequest(image=PNG, tiling=_tiling(64, -5)),
         Code.INVALID_ARGUMENT, "tiling.overlap"),
    Case("embed: 8 px tiles", "Embed", encoder_pb2.EmbedRequest(image=PNG, tiling=_tiling(8)), Code.INVALID_ARGUMENT,
         "tiling.tile_size"),
    Case("embed: overlap >= tile", "Embed", encoder_pb2.EmbedRequest(image=PNG, tiling=_tiling(64, 64)),
         Code.INVALID_ARGUMENT, "tiling.overlap"),
    Case("embed: too many tiles", "Embed", encoder_pb2.EmbedRequest(image=FLAT_1000, tiling=_tiling(32, 16)),
         Code.INVALID_ARGUMENT, "tiling.tile_size"),
    Case("embed: other tenant", "Embed", encoder_pb2.EmbedRequest(image=PNG, tenant="bravo"), Code.PERMISSION_DENIED,
         "tenant"),
    Case("embed: traversal tenant", "Embed", encoder_pb2.EmbedRequest(image=PNG, tenant="../x"),
         Code.PERMISSION_DENIED, "tenant"),
    Case("embed: no token", "Embed", encoder_pb2.EmbedRequest(image=PNG), Code.UNAUTHENTICATED, metadata=NO_TOKEN),
    Case("embed: unknown token", "Embed", encoder_pb2.EmbedRequest(image=PNG), Code.UNAUTHENTICATED,
         metadata=BAD_TOKEN),
    Case("get: empty key", "GetEmbedding", encoder_pb2.GetEmbeddingRequest(), Code.INVALID_ARGUMENT, "key"),
    Case("get: short key", "GetEmbedding", encoder_pb2.GetEmbeddingRequest(key="abc"), Code.INVALID_ARGUMENT, "key"),
    Case("get: upper-case key", "GetEmbedding", encoder_pb2.GetEmbeddingRequest(key="A" * 64), Code.INVALID_ARGUMENT,
         "key"),
    Case("get: traversal key", "GetEmbedding", encoder_pb2.GetEmbeddingRequest(key="../" * 21 + "x"),
         Code.INVALID_ARGUMENT, "key"),
    Case("get: unknown key", "GetEmbedding", encoder_pb2.GetEmbeddingRequest(key="0" * 64), Code.NOT_FOUND, "key"),
    Case("get: other tenant", "GetEmbedding", lambda o: encoder_pb2.GetEmbeddingRequest(key=o.key, tenant="bravo"),
         Code.PERMISSION_DENIED, "tenant"),
    Case("get: no token", "GetEmbedding", lambda o: encoder_pb2.GetEmbeddingRequest(key=o.key), Code.UNAUTHENTICATED,
         metadata=NO_TOKEN),
    Case("stats: no token", "Stats", encoder_pb2.StatsRequest(), Code.UNAUTHENTICATED, metadata=NO_TOKEN),
]

SEGMENT_CASES = [
    Case("segment: no prompts", "Segment", decoder_pb2.SegmentRequest(image=PNG), Code.INVALID_ARGUMENT, "prompts"),
    Case("segment: empty prompt", "Segment", _segment(decoder_pb2.Prompt()), Code.INVALID_ARGUMENT, "prompts[0]"),
    Case("segment: NaN box", "Segment", _segment(_box(), _box(y0=float("nan"))), Code.INVALID_ARGUMENT,
         "prompts[1].box"),
    Case("segment: inf point", "Segment", _segment(_points((float("inf"), 3, 1))), Code.INVALID_ARGUMENT,
         "prompts[0].point_coords"),
    Case("segment: box outside the image", "Segment", _segment(_box(x1=1e6)), Code.INVALID_ARGUMENT, "prompts[0].box"),
    Case("segment: negative coordinates", "Segment", _segment(_points((-1, 3, 1))), Code.INVALID_ARGUMENT,
         "prompts[0].point_coords"),
    Case("segment: inverted box", "Segment", _segment(_box(x0=30, x1=2)), Code.INVALID_ARGUMENT, "prompts[0].box"),
    Case("segment: label 7", "Segment", _segment(_points((3, 3, 7))), Code.INVALID_ARGUMENT,
         "prompts[0].point_labels"),
    Case("segment: 65 points", "Segment", _segment(_points(*[(3, 3, 1)] * 65)), Code.INVALID_ARGUMENT,
         "prompts[0].point_coords"),
    Case("segment: 17 prompts (limit 16)", "Segment", _segment(*[_box()] * 17), Code.INVALID_ARGUMENT, "prompts"),
    Case("segment: 10,000 prompts", "Segment", _segment(*[_box()] * 10_000), Code.INVALID_ARGUMENT, "prompts"),
    Case("segment: mask dtype", "Segment", _segment(_mask(dtype="int64")), Code.INVALID_ARGUMENT,
         "prompts[0].mask_input"),
    Case("segment: mask shape", "Segment", _segment(_mask(shape=(3, 7))), Code.INVALID_ARGUMENT,
         "prompts[0].mask_input"),
    Case("segment: mask bytes short", "Segment", _segment(_mask(nbytes=12)), Code.INVALID_ARGUMENT,
         "prompts[0].mask_input"),
    Case("segment: mask huge shape", "Segment", _segment(_mask(shape=(1, 1 << 31, 1 << 31))), Code.INVALID_ARGUMENT,
         "prompts[0].mask_input"),
    Case("segment: mask negative shape", "Segment", _segment(_mask(shape=(1, -8, -8))), Code.INVALID_ARGUMENT,
         "prompts[0].mask_input"),
    Case("segment: mask no shape", "Segment", _segment(_mask(shape=())), Code.INVALID_ARGUMENT,
         "prompts[0].mask_input"),
    Case("segment: NaN threshold", "Segment", _segment(threshold=float("nan")), Code.INVALID_ARGUMENT, "threshold"),
    Case("segment: inf threshold", "Segment", _segment(threshold=float("-inf")), Code.INVALID_ARGUMENT, "threshold"),
    Case("segment: unknown encoding", "Segment", _segment(encoding=99), Code.INVALID_ARGUMENT, "encoding"),
    Case("segment: no image, no key", "Segment", _segment(image=b""), Code.INVALID_ARGUMENT, "image"),
    Case("segment: unknown key", "Segment", _segment(image=b"", embedding_key="0" * 64), Code.NOT_FOUND,
         "embedding_key"),
    Case("segment: malformed key", "Segment", _segment(image=b"", embedding_key="zz"), Code.INVALID_ARGUMENT,
         "embedding_key"),
    Case("segment: garbage image", "Segment", _segment(image=b"GIF89a" + bytes(40)), Code.INVALID_ARGUMENT, "image"),
    Case("segment: huge header", "Segment", _segment(image=png_header_only(60000, 60000)), Code.INVALID_ARGUMENT,
         "image"),
    Case("segment: over the message limit", "Segment", _segment(image=bytes(9 * MIB)), Code.RESOURCE_EXHAUSTED),
    Case("segment: unknown adapter", "Segment", _segment(adapter=_ref("nope@prod")), Code.NOT_FOUND, "adapter"),
    Case("segment: traversal adapter", "Segment", _segment(adapter=_ref("../etc")), Code.INVALID_ARGUMENT, "adapter"),
    Case("segment: corrupt adapter", "Segment", _segment(adapter=_ref("broken:1")), Code.FAILED_PRECONDITION,
         "adapter"),
    Case("segment: tiled with low-res logits", "Segment", _segment(tiling=_tiling(), return_low_res_logits=True),
         Code.INVALID_ARGUMENT, "return_low_res_logits"),
    Case("segment: bad tile size", "Segment", _segment(tiling=_tiling(5)), Code.INVALID_ARGUMENT, "tiling.tile_size"),
    Case("segment: other tenant", "Segment", _segment(tenant="bravo"), Code.PERMISSION_DENIED, "tenant"),
    Case("segment: no token", "Segment", _segment(), Code.UNAUTHENTICATED, metadata=NO_TOKEN),
]

EVERYTHING_CASES = [
    Case("everything: points_per_side -1", "SegmentEverything", _everything(points_per_side=-1),
         Code.INVALID_ARGUMENT, "points_per_side"),
    Case("everything: points_per_side 100000", "SegmentEverything", _everything(points_per_side=100000),
         Code.INVALID_ARGUMENT, "points_per_side"),
    Case("everything: NaN iou threshold", "SegmentEverything", _everything(pred_iou_thresh=float("nan")),
         Code.INVALID_ARGUMENT, "pred_iou_thresh"),
    Case("everything: stability 2", "SegmentEverything", _everything(stability_score_thresh=2),
         Code.INVALID_ARGUMENT, "stability_score_thresh"),
    Case("everything: negative NMS", "SegmentEverything", _everything(box_nms_thresh=-0.5), Code.INVALID_ARGUMENT,
         "box_nms_thresh"),
    Case("everything: negative area", "SegmentEverything", _everything(min_mask_area=-1), Code.INVALID_ARGUMENT,
         "min_mask_area"),
    Case("everything: negative max masks", "SegmentEverything", _everything(max_masks=-1), Code.INVALID_ARGUMENT,
         "max_masks"),
    Case("everything: unknown encoding", "SegmentEverything", _everything(encoding=42), Code.INVALID_ARGUMENT,
         "encoding"),
    Case("everything: garbage image", "SegmentEverything", _everything(image=b"\xff\xd8\xff" + bytes(64)),
         Code.INVALID_ARGUMENT, "image"),
    Case("everything: no image, no key", "SegmentEverything", _everything(image=b""), Code.INVALID_ARGUMENT, "image"),
    Case("everything: unknown key", "SegmentEverything", _everything(image=b"", embedding_key="1" * 64),
         Code.NOT_FOUND, "embedding_key"),
    Case("everything: unknown adapter", "SegmentEverything", _everything(adapter=_ref("nope")), Code.NOT_FOUND,
         "adapter"),
    Case("everything: other tenant", "SegmentEverything", _everything(tenant="bravo"), Code.PERMISSION_DENIED,
         "tenant"),
    Case("everything: no token", "SegmentEverything", _everything(), Code.UNAUTHENTICATED, metadata=NO_TOKEN),
]

JOB_CASES = [
    Case("create: unknown method", "CreateJob", _job(method="magic"), Code.INVALID_ARGUMENT, "method"),
    Case("create: no method", "CreateJob", _job(method=""), Code.INVALID_ARGUMENT, "method"),
    Case("create: no adapter name", "CreateJob", _job(adapter_name=""), Code.INVALID_ARGUMENT, "adapter_name"),
    Case("create: traversal adapter name", "CreateJob", _job(adapter_name="../x"), Code.INVALID_ARGUMENT,
         "adapter_name"),
    Case("create: upper-case adapter name", "CreateJob", _job(adapter_name="Ships"), Code.INVALID_ARGUMENT,
         "adapter_name"),
    Case("create: traversal alias", "CreateJob", _job(promote_to="../prod"), Code.INVALID_ARGUMENT, "promote_to"),
    Case("create: no dataset", "CreateJob", _job(dataset=""), Code.INVALID_ARGUMENT, "dataset"),
    Case("create: absolute dataset", "CreateJob", _job(dataset="/etc"), Code.INVALID_ARGUMENT, "dataset"),
    Case("create: other tenant's folder", "CreateJob", _job(dataset="../bravo"), Code.INVALID_ARGUMENT, "dataset"),
    Case("create: missing dataset", "CreateJob", _job(dataset="nope"), Code.NOT_FOUND, "dataset"),
    Case("create: missing upload", "CreateJob", _job(dataset="uploads/" + "f" * 32), Code.NOT_FOUND, "dataset"),
    Case("create: NUL in dataset", "CreateJob", _job(dataset="emp\x00ty"), Code.INVALID_ARGUMENT, "dataset"),
    Case("create: 2000-character dataset", "CreateJob", _job(dataset="a" * 2000), Code.INVALID_ARGUMENT, "dataset"),
    Case("create: negative epochs", "CreateJob", _hp(epochs=-1), Code.INVALID_ARGUMENT, "hyperparameters.epochs"),
    Case("create: negative batch", "CreateJob", _hp(batch_size=-3), Code.INVALID_ARGUMENT,
         "hyperparameters.batch_size"),
    Case("create: negative rank", "CreateJob", _hp(rank=-8), Code.INVALID_ARGUMENT, "hyperparameters.rank"),
    Case("create: NaN lr", "CreateJob", _hp(lr=float("nan")), Code.INVALID_ARGUMENT, "hyperparameters.lr"),
    Case("create: inf lr", "CreateJob", _hp(lr=float("inf")), Code.INVALID_ARGUMENT, "hyperparameters.lr"),
    Case("create: negative lr", "CreateJob", _hp(lr=-1e-3), Code.INVALID_ARGUMENT, "hyperparameters.lr"),
    Case("create: val_fraction 1", "CreateJob", _hp(val_fraction=1.0), Code.INVALID_ARGUMENT,
         "hyperparameters.val_fraction"),
    *(Case(f"create: {name} 2^31-1", "CreateJob", _hp(**{name: 2**31 - 1}), Code.INVALID_ARGUMENT,
           f"hyperparameters.{name}")
      for name in ("epochs", "max_steps", "batch_size", "rank", "patience", "crop", "warmup_steps",
                   "checkpoint_every")),
    Case("create: lr 1e30", "CreateJob", _hp(lr=1e30), Code.INVALID_ARGUMENT, "hyperparameters.lr"),
    Case("create: crop 1", "CreateJob", _hp(crop=1), Code.INVALID_ARGUMENT, "hyperparameters.crop"),
    Case("create: unknown prompt kind", "CreateJob", _hp(prompt="circle"), Code.INVALID_ARGUMENT,
         "hyperparameters.prompt"),
    Case("create: other tenant", "CreateJob", _job(tenant="bravo"), Code.PERMISSION_DENIED, "tenant"),
    Case("create: no token", "CreateJob", _job(), Code.UNAUTHENTICATED, metadata=NO_TOKEN),
    Case("watch: unknown id", "WatchJob", trainer_pb2.WatchJobRequest(id="f" * 32), Code.NOT_FOUND, "job"),
    Case("watch: traversal id", "WatchJob", trainer_pb2.WatchJobRequest(id="../../etc"), Code.NOT_FOUND, "job"),
    Case("watch: empty id", "WatchJob", trainer_pb2.WatchJobRequest(), Code.NOT_FOUND, "job"),
    Case("watch: other tenant", "WatchJob", lambda o: trainer_pb2.WatchJobRequest(id=o.job_id, tenant="bravo"),
         Code.PERMISSION_DENIED, "tenant"),
    Case("cancel: unknown id", "CancelJob", trainer_pb2.CancelJobRequest(id="0" * 32), Code.NOT_FOUND, "job"),
    Case("cancel: other tenant", "CancelJob", lambda o: trainer_pb2.CancelJobRequest(id=o.job_id, tenant="bravo"),
         Code.PERMISSION_DENIED, "tenant"),
    Case("list jobs: other tenant", "ListJobs", trainer_pb2.ListJobsRequest(tenant="bravo"), Code.PERMISSION_DENIED,
         "tenant"),
    Case("list jobs: no token", "ListJobs", trainer_pb2.ListJobsRequest(), Code.UNAUTHENTICATED, metadata=NO_TOKEN),
]

_IMAGES = {"images/a.png": PNG, "masks/a.png": PNG}
UPLOAD_CASES = [
    Case("upload: no chunks", "UploadDataset", [], Code.INVALID_ARGUMENT, "data"),
    Case("upload: empty payload", "UploadDataset", _upload(b""), Code.INVALID_ARGUMENT, "data"),
    Case("upload: unsupported suffix", "UploadDataset", _upload(tar_bytes(_IMAGES), "data.rar"), Code.INVALID_ARGUMENT,
         "filename"),
    Case("upload: no file name", "UploadDataset", _upload(tar_bytes(_IMAGES), ""), Code.INVALID_ARGUMENT, "filename"),
    Case("upload: garbage tar.gz", "UploadDataset", _upload(b"\x1f\x8b" + bytes(500)), Code.INVALID_ARGUMENT, "data"),
    Case("upload: garbage zip", "UploadDataset", _upload(b"PK\x03\x04" + bytes(500), "d.zip"), Code.INVALID_ARGUMENT,
         "data"),
    Case("upload: truncated tar.gz", "UploadDataset", _upload(tar_bytes(_IMAGES)[:200]), Code.INVALID_ARGUMENT, "data"),
    Case("upload: '..' member", "UploadDataset", _upload(tar_bytes({**_IMAGES, "../../escaped.txt": b"x"})),
         Code.INVALID_ARGUMENT, "outside"),
    Case("upload: absolute member", "UploadDataset", _upload(tar_bytes({"/etc/cron.d/x": b"x"})), Code.INVALID_ARGUMENT,
         "absolute"),
    Case("upload: zip '..' member", "UploadDataset", _upload(_zip({"../x.png": PNG}), "d.zip"), Code.INVALID_ARGUMENT,
         "outside"),
    Case("upload: symlink member", "UploadDataset",
         _upload(tar_bytes(_IMAGES, symlinks={"images/b.png": "/etc/passwd"})), Code.INVALID_ARGUMENT, "link"),
    Case("upload: duplicate member", "UploadDataset", _upload(_zip({"images/a.png": PNG, "./images/a.png": PNG}),
                                                              "d.zip"), Code.INVALID_ARGUMENT, "twice"),
    Case("upload: no files", "UploadDataset", _upload(tar_bytes({}, mode="w")[:10240], "d.tar"), Code.INVALID_ARGUMENT,
         "no files"),
    Case("upload: zip bomb", "UploadDataset", _upload(_bomb("zip"), "d.zip"), Code.INVALID_ARGUMENT,
         "SAMFORGE_MAX_EXTRACT_RATIO"),
    Case("upload: tar.gz bomb", "UploadDataset", _upload(_bomb("tar")), Code.INVALID_ARGUMENT,
         "SAMFORGE_MAX_EXTRACT_RATIO"),
    Case("upload: over the upload limit", "UploadDataset", _upload(bytes(MIB + 1)), Code.INVALID_ARGUMENT, "limit"),
    Case("upload: chunk over the message limit", "UploadDataset",
         [trainer_pb2.DatasetChunk(filename="d.tar.gz", data=bytes(9 * MIB))], Code.RESOURCE_EXHAUSTED),
    Case("upload: other tenant", "UploadDataset", _upload(tar_bytes(_IMAGES), tenant="bravo"), Code.PERMISSION_DENIED,
         "tenant"),
    Case("upload: no token", "UploadDataset", _upload(tar_bytes(_IMAGES)), Code.UNAUTHENTICATED, metadata=NO_TOKEN),
]

REGISTRY_CASES = [
    Case("list adapters: traversal name", "ListAdapters", trainer_pb2.ListAdaptersRequest(name="../x"),
         Code.INVALID_ARGUMENT, "name"),
    Case("list adapters: other tenant", "ListAdapters", trainer_pb2.ListAdaptersRequest(tenant="bravo"),
         Code.PERMISSION_DENIED, "tenant"),
    Case("get adapter: empty ref", "GetAdapter", trainer_pb2.GetAdapterRequest(), Code.INVALID_ARGUMENT, "ref"),
    Case("get adapter: traversal ref", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="../x"),
         Code.INVALID_ARGUMENT, "adapter"),
    Case("get adapter: unknown", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="nope"), Code.NOT_FOUND, "adapter"),
    Case("get adapter: unknown version", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="ships:99"), Code.NOT_FOUND,
         "adapter"),
    Case("get adapter: unknown alias", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="ships@nope"), Code.NOT_FOUND,
         "adapter"),
    Case("get adapter: version 0", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="ships:0"), Code.INVALID_ARGUMENT,
         "adapter"),
    Case("get adapter: huge version", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="ships:99999999999"),
         Code.INVALID_ARGUMENT, "adapter"),
    Case("get adapter: version and alias", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="ships:1@prod"),
         Code.INVALID_ARGUMENT, "adapter"),
    Case("get adapter: corrupt files", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="broken"),
         Code.FAILED_PRECONDITION, "adapter"),
    Case("promote: unknown version", "Promote", trainer_pb2.PromoteRequest(name="ships", alias="prod", version=99),
         Code.NOT_FOUND, "adapter"),
    Case("promote: version 0", "Promote", trainer_pb2.PromoteRequest(name="ships", alias="prod"),
         Code.INVALID_ARGUMENT, "version"),
    Case("promote: negative version", "Promote", trainer_pb2.PromoteRequest(name="ships", alias="prod", version=-1),
         Code.INVALID_ARGUMENT, "version"),
    Case("promote: traversal alias", "Promote", trainer_pb2.PromoteRequest(name="ships", alias="../a", version=1),
         Code.INVALID_ARGUMENT, "alias"),
    Case("promote: empty alias", "Promote", trainer_pb2.PromoteRequest(name="ships", version=1),
         Code.INVALID_ARGUMENT, "alias"),
    Case("promote: unknown name", "Promote", trainer_pb2.PromoteRequest(name="nope", alias="prod", version=1),
         Code.NOT_FOUND, "adapter"),
    Case("promote: other tenant", "Promote", trainer_pb2.PromoteRequest(tenant="bravo", name="ships", alias="p",
                                                                        version=1), Code.PERMISSION_DENIED, "tenant"),
    Case("rollback: no history", "Rollback", trainer_pb2.RollbackRequest(name="ships", alias="prod"),
         Code.FAILED_PRECONDITION, "alias"),
    Case("rollback: unknown alias", "Rollback", trainer_pb2.RollbackRequest(name="ships", alias="nope"),
         Code.NOT_FOUND, "adapter"),
    Case("rollback: traversal alias", "Rollback", trainer_pb2.RollbackRequest(name="ships", alias="../x"),
         Code.INVALID_ARGUMENT, "alias"),
    Case("delete: aliased version", "Delete", trainer_pb2.DeleteRequest(name="ships", version=2),
         Code.FAILED_PRECONDITION, "prod"),
    Case("delete: version 0", "Delete", trainer_pb2.DeleteRequest(name="ships"), Code.INVALID_ARGUMENT, "version"),
    Case("delete: unknown version", "Delete", trainer_pb2.DeleteRequest(name="ships", version=99), Code.NOT_FOUND,
         "adapter"),
    Case("delete: traversal name", "Delete", trainer_pb2.DeleteRequest(name="../ships", version=1),
         Code.INVALID_ARGUMENT, "name"),
    Case("delete: no token", "Delete", trainer_pb2.DeleteRequest(name="ships", version=1), Code.UNAUTHENTICATED,
         metadata=NO_TOKEN),
]

CASES: list[Case] = [*ENCODER_CASES, *SEGMENT_CASES, *EVERYTHING_CASES, *JOB_CASES, *UPLOAD_CASES, *REGISTRY_CASES]
RequestFactory = Callable[[Any], Any]
