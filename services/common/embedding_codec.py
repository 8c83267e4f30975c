"""Wire format of an embedding: ``EmbeddingInfo`` + a stream of ``EmbeddingChunk`` (encoder -> decoder).

The encoder streams a :data:`ServedEmbedding` with :func:`embedding_chunks`; the decoder service (and any
client) reassembles a ``GetEmbedding`` stream with :func:`embedding_from_chunks`::

    from services.common.embedding_codec import embedding_from_chunks

    stream = encoder_stub.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=key, tenant=tenant), timeout=30)
    embedding = embedding_from_chunks(stream)   # sam_core Embedding, or TiledEmbedding if info.num_tiles > 0

Layout (all little-endian float32, row-major):

* the first chunk carries ``info``, ``dtype`` ("float32"), ``total_bytes`` and, for tiled embeddings,
  ``tile_origins`` = flattened (y, x) pairs, the whole image first as (0, 0), then each tile;
* ``info.levels`` names the feature levels in order with their shapes (1 x C x h x w; SAM 1: one,
  ``image_embed``; SAM 2.1: three); ``info.feature_shape`` repeats the first level's shape, and a stream
  without ``levels`` (an older server) is one level named :data:`LEGACY_LEVEL`;
* ``data`` of all chunks concatenated = the whole image's levels in order, then each tile's levels (same
  shapes), each chunk at most :data:`CHUNK_BYTES` (1 MiB) so a 4 MB LiteMedSAM embedding streams under
  gRPC's default 4 MB message limit;
* ``info.original_size`` / ``info.input_size`` are (height, width) pairs: one pair for a plain embedding;
  for a tiled one ``1 + num_tiles`` pairs in the order of ``tile_origins`` (whole image, then tiles).

The reassembled features are bit-identical to the encoder's. A tiled embedding's ``tile_size`` and
``overlap`` are not on the wire: they are derived from the tile geometry (the effective tile side and the
smallest overlap between neighbouring tiles; :func:`sam_core.inference.tiling.decode_tiled` reads neither).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from sam_core.inference.tiling import TiledEmbedding
from sam_core.inference.types import Embedding
from sam_core.modeling.family import Features
from services._generated.sam.v1 import common_pb2, encoder_pb2

ServedEmbedding = Embedding | TiledEmbedding
"""What the encoder serves for one key: a plain embedding, or a tiled one (whole image + tiles)."""

CHUNK_BYTES = 1 << 20
DTYPE = "float32"
LEGACY_LEVEL = "image_embed"
"""The one level of a stream from a server that predates ``EmbeddingInfo.levels``."""
_WIRE_DTYPE = np.dtype("<f4")


class MalformedEmbeddingStream(ValueError):
    """The chunks do not form a valid embedding (a bug or version skew, never a caller's mistake)."""


def parts_of(value: ServedEmbedding) -> tuple[list[Embedding], list[tuple[int, int]]]:
    """(embeddings, origins): ``[whole, *tiles]`` and their (y, x) origins (the whole image at (0, 0))."""
    if isinstance(value, TiledEmbedding):
        return [value.whole, *value.tiles], [(0, 0), *[(int(y), int(x)) for y, x in value.origins]]
    return [value], [(0, 0)]


def embedding_info(key: str, value: ServedEmbedding) -> common_pb2.EmbeddingInfo:
    """The ``EmbeddingInfo`` of a cached value (sizes as (h, w) pairs, see the module docstring)."""
    parts, _ = parts_of(value)
    first = parts[0]
    tiled = isinstance(value, TiledEmbedding)
    return common_pb2.EmbeddingInfo(
        key=key, model_id=first.model_id, encoder_adapter=first.encoder_adapter or "",
        preprocess_version=first.preprocess_version, feature_shape=list(first.image_embedding.shape),
        levels=[common_pb2.FeatureLevel(name=name, shape=list(shape))
                for name, shape in first.feature_shapes().items()],
        original_size=[int(v) for p in parts for v in p.original_size],
        input_size=[int(v) for p in parts for v in p.input_size],
        num_tiles=len(parts) - 1 if tiled else 0, nbytes=int(value.nbytes),
    )


def _wire_bytes(features: torch.Tensor) -> memoryview:
    array = features.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return np.ascontiguousarray(array, dtype=_WIRE_DTYPE).data.cast("B")


def embedding_chunks(key: str, value: ServedEmbedding,
                     chunk_bytes: int = CHUNK_BYTES) -> Iterator[encoder_pb2.EmbeddingChunk]:
    """Stream ``value`` as chunks of at most ``chunk_bytes`` data bytes (the first one with the header)."""
    parts, origins = parts_of(value)
    total = sum(t.nelement() * 4 for p in parts for t in p.features.values())
    header: encoder_pb2.EmbeddingChunk | None = encoder_pb2.EmbeddingChunk(
        info=embedding_info(key, value), dtype=DTYPE, total_bytes=total,
        tile_origins=[v for origin in origins for v in origin] if isinstance(value, TiledEmbedding) else [])
    buffer = bytearray()
    for view in (_wire_bytes(t) for part in parts for t in part.features.values()):
        start = 0
        while start < len(view):
            take = min(chunk_bytes - len(buffer), len(view) - start)
            buffer += view[start:start + take]
            start += take
            if len(buffer) == chunk_bytes:
                yield _chunk(header, bytes(buffer))
                header, buffer = None, bytearray()
    if buffer or header is not None:
        yield _chunk(header, bytes(buffer))


def _chunk(header: encoder_pb2.EmbeddingChunk | None, data: bytes) -> encoder_pb2.EmbeddingChunk:
    if header is None:
        return encoder_pb2.EmbeddingChunk(data=data)
    header.data = data
    return header


def _pairs(values: Sequence[int], count: int, name: str) -> list[tuple[int, int]]:
    if len(values) != 2 * count:
        raise MalformedEmbeddingStream(f"{name} has {len(values)} values, expected {2 * count} ({count} pairs)")
    return [(int(values[2 * i]), int(values[2 * i + 1])) for i in range(count)]


def derived_geometry(origins: Sequence[tuple[int, int]], sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(tile_size, overlap) implied by tile origins and crop sizes (overlap 0 when tiles do not touch)."""
    tile = max(max(h, w) for h, w in sizes)
    overlaps = []
    for axis in (0, 1):
        starts = sorted({o[axis] for o in origins})
        overlaps += [tile - (b - a) for a, b in zip(starts, starts[1:], strict=False)]
    return tile, max(0, min(overlaps)) if overlaps else 0


def assemble(parts: Sequence[Features], *, original_sizes: Sequence[tuple[int, int]],
             input_sizes: Sequence[tuple[int, int]],
             origins: Sequence[tuple[int, int]] | None, model_id: str, preprocess_version: str,
             encoder_adapter: str | None, tile_size: int | None = None,
             overlap: int | None = None) -> ServedEmbedding:
    """N parts' named features (N = 1, or 1 + tiles when ``origins`` is given) -> Embedding / TiledEmbedding.

    ``origins`` excludes the whole image's (0, 0).
    """
    embeddings = [
        Embedding(features=features, original_size=original_sizes[i], input_size=input_sizes[i],
                  model_id=model_id, preprocess_version=preprocess_version, encoder_adapter=encoder_adapter or None)
        for i, features in enumerate(parts)]
    if origins is None:
        return embeddings[0]
    if tile_size is None or overlap is None:
        tile_size, overlap = derived_geometry(origins, original_sizes[1:])
    return TiledEmbedding(whole=embeddings[0], tiles=embeddings[1:], origins=list(origins), tile_size=tile_size,
                          overlap=overlap)


def embedding_from_chunks(chunks: Iterable[encoder_pb2.EmbeddingChunk]) -> ServedEmbedding:
    """Reassemble a ``GetEmbedding`` stream into the encoder's Embedding / TiledEmbedding (CPU, float32).

    Raises :class:`MalformedEmbeddingStream` if the stream is empty, lacks its header, has an unknown
    dtype or its byte count disagrees with the header. gRPC errors of the stream propagate unchanged.
    """
    iterator = iter(chunks)
    first = next(iterator, None)
    if first is None or not first.HasField("info"):
        raise MalformedEmbeddingStream("the first chunk carries no EmbeddingInfo")
    info = first.info
    if first.dtype != DTYPE:
        raise MalformedEmbeddingStream(f"unsupported dtype {first.dtype!r}, expected {DTYPE!r}")
    levels = _levels(info)
    count = 1 + int(info.num_tiles)
    expected = count * sum(int(np.prod(shape)) for shape in levels.values()) * 4
    if first.total_bytes != expected:
        raise MalformedEmbeddingStream(f"total_bytes {first.total_bytes} != {expected} for {count} x {levels}")
    buffer = bytearray(expected)
    filled = 0
    for chunk in _chain(first, iterator):
        end = filled + len(chunk.data)
        if end > expected:
            raise MalformedEmbeddingStream(f"more than the announced {expected} bytes")
        buffer[filled:end] = chunk.data
        filled = end
    if filled != expected:
        raise MalformedEmbeddingStream(f"stream ended after {filled} of {expected} bytes")
    array = np.frombuffer(buffer, dtype=_WIRE_DTYPE).astype(np.float32, copy=False)  # no copy on little-endian
    parts = _split_levels(torch.from_numpy(array), count, levels)
    origins = None
    if info.num_tiles > 0:
        origins = _pairs(first.tile_origins, count, "tile_origins")[1:]
    return assemble(parts, original_sizes=_pairs(info.original_size, count, "original_size"),
                    input_sizes=_pairs(info.input_size, count, "input_size"), origins=origins,
                    model_id=info.model_id, preprocess_version=info.preprocess_version,
                    encoder_adapter=info.encoder_adapter or None)


def _levels(info: common_pb2.EmbeddingInfo) -> dict[str, tuple[int, ...]]:
    """name -> shape of every level the header announces (validated: 1 x C x h x w, distinct names)."""
    if info.levels:
        levels = {level.name: tuple(int(v) for v in level.shape) for level in info.levels}
        if len(levels) != len(info.levels) or not all(levels):
            raise MalformedEmbeddingStream(f"levels {[level.name for level in info.levels]} are not distinct names")
    else:
        levels = {LEGACY_LEVEL: tuple(int(v) for v in info.feature_shape)}
    for name, shape in levels.items():
        if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
            raise MalformedEmbeddingStream(f"level {name!r} has shape {list(shape)}, not 1 x C x h x w")
    return levels


def _split_levels(flat: torch.Tensor, count: int, levels: dict[str, tuple[int, ...]]) -> list[Features]:
    """The stream's float32 values -> ``count`` parts' named features (views of ``flat``)."""
    parts: list[Features] = []
    offset = 0
    for _ in range(count):
        part: Features = {}
        for name, shape in levels.items():
            size = int(np.prod(shape))
            part[name] = flat[offset:offset + size].view(shape)
            offset += size
        parts.append(part)
    return parts


def _chain(first: encoder_pb2.EmbeddingChunk,
           rest: Iterator[encoder_pb2.EmbeddingChunk]) -> Iterator[encoder_pb2.EmbeddingChunk]:
    yield first
    yield from rest
