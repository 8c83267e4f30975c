"""Tests of sam_core.inference.embedding_store: the on-disk, signature-checked EmbeddingStore."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from sam_core.errors import InvalidInput
from sam_core.inference.embedding_cache import embedding_key
from sam_core.inference.embedding_store import EmbeddingStore
from sam_core.inference.predictor import Predictor
from sam_core.inference.types import Embedding


@pytest.fixture(scope="module")
def embedding(tiny_model) -> Embedding:
    image = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    return Predictor(tiny_model).encode_one(image)


@pytest.fixture()
def signature(embedding: Embedding) -> dict[str, str]:
    return {
        "model_id": embedding.model_id,
        "preprocess_version": embedding.preprocess_version,
        "encoder_adapter": "",
        "dataset": "fingerprint-1",
    }


def _key(embedding: Embedding, name: str = "img") -> str:
    return embedding_key(name * 4, embedding.model_id, embedding.preprocess_version, embedding.encoder_adapter)


# --------------------------------------------------------------------------------------------- store


def test_missing_or_unreadable_signature_file(tmp_path: Path, embedding: Embedding,
                                              signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    store.put(_key(embedding), embedding)
    (tmp_path / "signature.json").unlink()
    with pytest.raises(InvalidInput, match="signature.json is missing"):
        EmbeddingStore(tmp_path, signature=signature)
    (tmp_path / "signature.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="unreadable"):
        EmbeddingStore(tmp_path, signature=signature)
    fresh = EmbeddingStore(tmp_path, signature=signature, reset_on_mismatch=True)
    assert fresh.reset_fields == ("signature.json",) and len(fresh) == 0


def test_round_trip_float32_is_bit_exact(tmp_path: Path, embedding: Embedding, signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path / "store", signature=signature)
    key = _key(embedding)
    assert store.get(key) is None and key not in store and len(store) == 0
    store.put(key, embedding)
    path = tmp_path / "store" / key[:2] / f"{key}.safetensors"
    assert path.is_file() and key in store and len(store) == 1
    assert store.nbytes() == path.stat().st_size > embedding.nbytes
    loaded = store.get(key)
    assert loaded is not None
    assert loaded.feature_shapes() == embedding.feature_shapes() and loaded.image_embedding.dtype == torch.float32
    assert torch.equal(loaded.image_embedding, embedding.image_embedding)
    assert dataclasses.replace(loaded, features=None) == dataclasses.replace(embedding, features=None)
    # Readable by plain safetensors, with the documented metadata.
    tensors = safetensors.torch.load_file(path)
    assert list(tensors) == ["image_embed"]
    with safetensors.safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["levels"]) == ["image_embed"]
    assert meta["key"] == key and meta["model_id"] == embedding.model_id
    assert json.loads(meta["original_size"]) == list(embedding.original_size)
    assert json.loads(meta["input_size"]) == list(embedding.input_size)
    assert meta["preprocess_version"] == embedding.preprocess_version and meta["encoder_adapter"] == ""
    # A new store object over the same directory reads the same entry.
    again = EmbeddingStore(tmp_path / "store", signature=signature).get(key)
    assert again is not None and torch.equal(again.image_embedding, embedding.image_embedding)


def test_bfloat16_halves_size_and_returns_float32(tmp_path: Path, embedding: Embedding,
                                                  signature: dict[str, str]) -> None:
    full = EmbeddingStore(tmp_path / "f32", signature=signature)
    half = EmbeddingStore(tmp_path / "bf16", signature=signature, dtype="bfloat16")
    key = _key(embedding)
    full.put(key, embedding)
    half.put(key, embedding)
    loaded = half.get(key)
    assert loaded is not None and loaded.image_embedding.dtype == torch.float32
    torch.testing.assert_close(loaded.image_embedding, embedding.image_embedding, rtol=1e-2, atol=1e-2)
    assert half.nbytes() < 0.6 * full.nbytes()
    # Reopening a bf16 store as float32 is a signature mismatch (precision would silently change).
    with pytest.raises(InvalidInput, match="dtype"):
        EmbeddingStore(tmp_path / "bf16", signature=signature)


def test_signature_mismatch_on_reopen_names_fields(tmp_path: Path, embedding: Embedding,
                                                   signature: dict[str, str]) -> None:
    EmbeddingStore(tmp_path, signature=signature).put(_key(embedding), embedding)
    other = {**signature, "dataset": "fingerprint-2"}
    with pytest.raises(InvalidInput) as info:
        EmbeddingStore(tmp_path, signature=other)
    assert info.value.field == "embedding_store"
    assert "dataset" in str(info.value) and "fingerprint-1" in str(info.value)
    assert "model_id" not in info.value.detail
    with pytest.raises(InvalidInput, match="extra"):
        EmbeddingStore(tmp_path, signature={**signature, "extra": "x"})
    # The failed opens changed nothing.
    assert len(EmbeddingStore(tmp_path, signature=signature)) == 1


def test_reset_on_mismatch_wipes_entries(tmp_path: Path, embedding: Embedding, signature: dict[str, str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    store.put(_key(embedding, "a"), embedding)
    store.put(_key(embedding, "b"), embedding)
    (tmp_path / "notes.txt").write_text("keep me")
    assert len(store) == 2 and store.reset_fields == ()
    other = {**signature, "dataset": "fingerprint-2"}
    with caplog.at_level("WARNING", logger="sam_core.inference.embedding_store"):
        fresh = EmbeddingStore(tmp_path, signature=other, reset_on_mismatch=True)
    assert fresh.reset_fields == ("dataset",) and "dataset" in caplog.text
    assert len(fresh) == 0 and fresh.get(_key(embedding, "a")) is None
    assert json.loads((tmp_path / "signature.json").read_text())["signature"] == other
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    # Reopening with the new signature is now fine; with the old one it is a mismatch.
    assert EmbeddingStore(tmp_path, signature=other).reset_fields == ()
    with pytest.raises(InvalidInput):
        EmbeddingStore(tmp_path, signature=signature)


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_truncated_entry_is_deleted_and_absent(tmp_path: Path, embedding: Embedding, signature: dict[str, str],
                                               cut: float, caplog: pytest.LogCaptureFixture) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    key = _key(embedding)
    store.put(key, embedding)
    path = store.path_for(key)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with caplog.at_level("WARNING", logger="sam_core.inference.embedding_store"):
        assert store.get(key) is None
    assert not path.exists() and key not in store and "corrupt" in caplog.text


def test_flipped_feature_bytes_are_detected(tmp_path: Path, embedding: Embedding, signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    key = _key(embedding)
    store.put(key, embedding)
    path = store.path_for(key)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.get(key) is None and not path.exists()


def test_entry_with_other_model_id_is_refused(tmp_path: Path, embedding: Embedding,
                                              signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    foreign = dataclasses.replace(embedding, model_id="another-model")
    key = _key(embedding)
    # put refuses an embedding that contradicts the signature ...
    with pytest.raises(InvalidInput) as info:
        store.put(key, foreign)
    assert info.value.field == "embedding" and "model_id" in str(info.value)
    assert key not in store
    # ... and get refuses a file written by a store with another model_id (copied in by hand).
    other = EmbeddingStore(tmp_path / "other", signature={**signature, "model_id": "another-model"})
    other.put(key, foreign)
    store.path_for(key).parent.mkdir(exist_ok=True)
    store.path_for(key).write_bytes(other.path_for(key).read_bytes())
    with pytest.raises(InvalidInput) as info:
        store.get(key)
    assert info.value.field == "embedding_store" and "another-model" in str(info.value)
    assert store.path_for(key).exists()  # refused, not deleted


def test_entry_under_wrong_key_is_refused(tmp_path: Path, embedding: Embedding, signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    key_a, key_b = _key(embedding, "a"), _key(embedding, "b")
    store.put(key_a, embedding)
    store.path_for(key_b).parent.mkdir(exist_ok=True)
    store.path_for(key_a).replace(store.path_for(key_b))
    with pytest.raises(InvalidInput, match="key"):
        store.get(key_b)


def test_bad_keys_are_rejected(tmp_path: Path, embedding: Embedding, signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    for bad in ("../../etc/passwd", "ABCDEF0123", "ab", ""):
        with pytest.raises(InvalidInput) as info:
            store.put(bad, embedding)
        assert info.value.field == "key"
        assert bad not in store


def test_atomic_write_leaves_no_temp_files(tmp_path: Path, embedding: Embedding, signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    key = _key(embedding)
    store.put(key, embedding)
    store.put(key, embedding)  # overwrite
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [f"{key[:2]}/{key}.safetensors", "signature.json"]


def test_failed_write_leaves_no_temp_files(tmp_path: Path, embedding: Embedding, signature: dict[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    key = _key(embedding)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr("sam_core.files.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        store.put(key, embedding)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["signature.json"]


def test_get_or_compute_calls_compute_once(tmp_path: Path, embedding: Embedding, signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    key = _key(embedding)
    calls: list[int] = []

    def compute() -> Embedding:
        calls.append(1)
        return embedding

    first = store.get_or_compute(key, compute)
    second = store.get_or_compute(key, compute)
    reopened = EmbeddingStore(tmp_path, signature=signature).get_or_compute(key, compute)
    assert len(calls) == 1
    for result in (first, second, reopened):
        assert torch.equal(result.image_embedding, embedding.image_embedding)


def test_get_or_compute_bf16_returns_stored_precision(tmp_path: Path, embedding: Embedding,
                                                      signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path, signature=signature, dtype="bfloat16")
    key = _key(embedding)
    first = store.get_or_compute(key, lambda: embedding)
    later = store.get(key)
    assert later is not None and first.image_embedding.dtype == torch.float32
    assert torch.equal(first.image_embedding, later.image_embedding)


def test_clear(tmp_path: Path, embedding: Embedding, signature: dict[str, str]) -> None:
    store = EmbeddingStore(tmp_path, signature=signature)
    for name in "abc":
        store.put(_key(embedding, name), embedding)
    assert len(store) == 3 and store.nbytes() > 0
    store.clear()
    assert len(store) == 0 and store.nbytes() == 0
    assert (tmp_path / "signature.json").is_file()


def multi_level(embedding: Embedding) -> Embedding:
    """``embedding`` plus two finer levels, named so that their sorted order is not the model's order."""
    generator = torch.Generator().manual_seed(3)
    levels = {"image_embed": embedding.image_embedding,
              "high_res_feat_s1": torch.randn(1, 8, 16, 16, generator=generator),
              "high_res_feat_s0": torch.randn(1, 4, 32, 32, generator=generator)}
    return dataclasses.replace(embedding, features=levels)


def test_every_level_round_trips_bit_exact_in_the_models_order(tmp_path: Path, embedding: Embedding,
                                                                signature: dict[str, str]) -> None:
    levels = multi_level(embedding)
    store = EmbeddingStore(tmp_path / "store", signature=signature)
    store.put(_key(levels), levels)
    loaded = store.get(_key(levels))
    assert loaded is not None and list(loaded.features) == list(levels.features)
    assert all(torch.equal(loaded.features[name], t) for name, t in levels.features.items())
    assert loaded.nbytes == levels.nbytes > embedding.nbytes


def test_an_entry_missing_a_level_is_corrupt_and_deleted(tmp_path: Path, embedding: Embedding,
                                                         signature: dict[str, str]) -> None:
    levels = multi_level(embedding)
    store = EmbeddingStore(tmp_path / "store", signature=signature)
    key = _key(levels)
    store.put(key, levels)
    path = store.path_for(key)
    with safetensors.safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        kept = {name: fh.get_tensor(name) for name in ("image_embed", "high_res_feat_s0")}
    path.write_bytes(safetensors.torch.save(kept, metadata=meta))
    assert store.get(key) is None and not path.exists()
