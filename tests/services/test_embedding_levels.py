"""Multi-level embeddings (SAM 2.1: three named feature tensors) through every wire and cache format.

The codec (encoder -> decoder stream) and the Redis L2 value must give back every level bit-exact, in the
model's order (not sorted by name), for plain and tiled embeddings; a stream from an older server without
``levels`` is one level named ``image_embed``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sam_core.inference.tiling import TiledEmbedding
from sam_core.inference.types import Embedding
from services.common.embedding_codec import (
    LEGACY_LEVEL,
    MalformedEmbeddingStream,
    embedding_chunks,
    embedding_from_chunks,
)
from services.encoder.l2 import decode_entry, encode_entry

# the order of SAM 2.1's levels in samforge; sorted by name it would differ
LEVELS = {"image_embed": (1, 16, 8, 8), "high_res_feat_s0": (1, 4, 32, 32), "high_res_feat_s1": (1, 8, 16, 16)}


def three_levels(seed: int, size: tuple[int, int] = (40, 30)) -> Embedding:
    generator = torch.Generator().manual_seed(seed)
    features = {name: torch.randn(shape, generator=generator) for name, shape in LEVELS.items()}
    return Embedding(features=features, original_size=size, input_size=(32, 24), model_id="sam2-test",
                     preprocess_version="p", encoder_adapter=None)


def tiled_three_levels() -> TiledEmbedding:
    return TiledEmbedding(whole=three_levels(0, (64, 64)), tiles=[three_levels(1, (40, 40)), three_levels(2, (40, 24))],
                          origins=[(0, 0), (0, 40)], tile_size=40, overlap=0)


def assert_same(ours: Embedding, theirs: Embedding) -> None:
    assert list(ours.features) == list(theirs.features) == list(LEVELS)
    assert all(torch.equal(ours.features[name], level) for name, level in theirs.features.items())
    assert dataclasses.replace(ours, features={}) == dataclasses.replace(theirs, features={})


def test_codec_streams_every_level_bit_exact_in_order():
    embedding = three_levels(0)
    chunks = list(embedding_chunks("k", embedding, chunk_bytes=1000))
    info = chunks[0].info
    assert [level.name for level in info.levels] == list(LEVELS)
    assert list(info.feature_shape) == list(LEVELS["image_embed"]) and info.nbytes == embedding.nbytes
    back = embedding_from_chunks(chunks)
    assert isinstance(back, Embedding)
    assert_same(back, embedding)


def test_codec_streams_a_tiled_multi_level_embedding():
    tiled = tiled_three_levels()
    back = embedding_from_chunks(embedding_chunks("k", tiled, chunk_bytes=777))
    assert isinstance(back, TiledEmbedding) and back.origins == tiled.origins
    for ours, theirs in zip([back.whole, *back.tiles], [tiled.whole, *tiled.tiles], strict=True):
        assert_same(ours, theirs)


def test_a_stream_without_levels_is_one_image_embed_level():
    single = dataclasses.replace(three_levels(0), features={"image_embed": torch.randn(1, 16, 8, 8)})
    chunks = list(embedding_chunks("k", single))
    del chunks[0].info.levels[:]  # what a server from before multi-level embeddings sends
    back = embedding_from_chunks(chunks)
    assert isinstance(back, Embedding) and list(back.features) == [LEGACY_LEVEL]
    assert torch.equal(back.image_embedding, single.image_embedding)


def test_codec_rejects_duplicate_or_malformed_levels():
    chunks = list(embedding_chunks("k", three_levels(0)))
    chunks[0].info.levels[1].name = "image_embed"
    with pytest.raises(MalformedEmbeddingStream, match="distinct"):
        embedding_from_chunks(chunks)
    chunks = list(embedding_chunks("k", three_levels(0)))
    del chunks[0].info.levels[2].shape[0]
    with pytest.raises(MalformedEmbeddingStream, match="high_res_feat_s1"):
        embedding_from_chunks(chunks)


def test_l2_value_keeps_every_level_bit_exact():
    embedding = three_levels(0)
    back = decode_entry(encode_entry("k" * 64, "a", embedding), "k" * 64, "a")
    assert isinstance(back, Embedding)
    assert_same(back, embedding)
    tiled = tiled_three_levels()
    again = decode_entry(encode_entry("k" * 64, "a", tiled), "k" * 64, "a")
    assert isinstance(again, TiledEmbedding)
    for ours, theirs in zip([again.whole, *again.tiles], [tiled.whole, *tiled.tiles], strict=True):
        assert_same(ours, theirs)
