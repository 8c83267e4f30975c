"""EmbeddingEngine in-process with the tiny model (no gRPC): keys, single-flight, batching, caches, adapters."""

from __future__ import annotations

import io
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.errors import AdapterInvalid, ImageDecodeError, ImageTooLarge, InvalidInput, NotFound, Overloaded
from sam_core.inference.predictor import Predictor
from sam_core.inference.tiling import TiledEmbedding
from sam_core.inference.types import Embedding
from sam_core.modeling.preprocess import preprocess
from sam_core.modeling.registry import build_tiny
from services.common import adapter_models
from services.common.embedding_codec import MalformedEmbeddingStream, embedding_chunks, embedding_from_chunks
from services.common.net import free_port
from services.common.settings import EncoderSettings
from services.common.status import Cancelled
from services.common.tiling import TilingRequest
from services.encoder import engine as engine_module
from services.encoder.engine import EmbeddingEngine, client_key
from services.encoder.l2 import RedisL2, decode_entry, encode_entry
from tests.conftest import save_perturbed_adapter
from tests.services.fakes import FakeRedis

TINY_BYTES = 32 * 8 * 8 * 4  # one tiny-model embedding: 1 x 32 x 8 x 8 float32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def png(seed: int, height: int = 48, width: int = 64) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


@pytest.fixture()
def make_engine(tiny_model, tmp_path):
    engines: list[EmbeddingEngine] = []

    def make(store=None, l2=None, **env: str) -> EmbeddingEngine:
        values = {"SAMFORGE_MODEL": "tiny", "SAMFORGE_REGISTRY_DIR": str(tmp_path / "registry"), **env}
        engine = EmbeddingEngine(tiny_model, EncoderSettings.from_env(values), store=store, l2=l2,
                                 watch_interval=0.05)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


class Gate:
    """Wraps a predictor's encoder call so the test decides when it runs (``entered`` is set once it is called)."""

    def __init__(self, predictor: Predictor) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self._encode_tensor = predictor.encode_tensor
        predictor.encode_tensor = self

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.release.wait(30)
        return self._encode_tensor(batch)


def run_threads(target, count: int) -> tuple[list, list[threading.Thread]]:
    results: list = [None] * count

    def work(i: int) -> None:
        try:
            results[i] = target(i)
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return results, threads


# ---------------------------------------------------------------------------------------------- keys


def test_keys_are_tenant_scoped_and_canonical(make_engine, tiny_model):
    engine = make_engine()
    a = engine.embed("a", png(0))
    assert not a.cached and a.source == "encoder" and a.encode_ms > 0
    again = engine.embed("a", png(0))
    assert again.cached and again.key == a.key and again.encode_ms == 0.0
    b = engine.embed("b", png(0))
    assert b.key != a.key and not b.cached  # no cross-tenant sharing, even for identical pixels
    with pytest.raises(NotFound) as info:
        engine.get("b", a.key)
    assert info.value.field == "key" and "Embed" in str(info.value)
    assert torch.equal(engine.get("a", a.key).image_embedding, a.value.image_embedding)
    reference = Predictor(tiny_model).encode_one(np.asarray(Image.open(io.BytesIO(png(0))).convert("RGB")))
    assert torch.equal(a.value.image_embedding, reference.image_embedding)
    with pytest.raises(InvalidInput):
        engine.get("a", "../../etc")
    default_tiles = engine.embed("a", png(0), tiling=TilingRequest())
    explicit = engine.embed("a", png(0), tiling=TilingRequest(tile_size=128, overlap=64))
    assert default_tiles.key == explicit.key != a.key and explicit.cached
    assert (engine.stats("a").encodes, engine.stats("b").encodes) == (3, 1)  # a + tiled (whole + 1 tile); b
    assert client_key("a", "0" * 64, None, "fp32") != client_key("a", "0" * 64, None, "bf16")


def test_image_limits_name_the_image_field(make_engine):
    engine = make_engine(SAMFORGE_MAX_IMAGE_BYTES="2000")
    with pytest.raises(ImageTooLarge) as info:
        engine.embed("a", png(1))
    assert info.value.field == "image"
    with pytest.raises(ImageDecodeError) as info:
        engine.embed("a", b"not an image")
    assert info.value.field == "image"
    with pytest.raises(InvalidInput) as info:
        make_engine().embed("a", png(1), tiling=TilingRequest(tile_size=8))
    assert info.value.field == "tiling.tile_size"


def test_extreme_aspect_ratio_images_embed(make_engine):
    """A valid 1 x 5000 PNG (its short side rounds to 0 px at the model's input size) embeds like any image;
    it used to fail its request with an internal error inside the resize."""
    engine = make_engine()
    for height, width in ((1, 5000), (5000, 1)):
        result = engine.embed("a", png(3, height, width))
        assert result.value.original_size == (height, width) and result.source == "encoder"


# ------------------------------------------------------------------------------------ single-flight


def test_concurrent_requests_for_one_key_encode_once(make_engine):
    engine = make_engine()
    gate = Gate(engine.base)
    image = png(2)
    results, threads = run_threads(lambda i: engine.embed("a", image), 8)
    wait_for(lambda: engine.l1.misses >= 8)  # all 8 missed L1: each leads or joins the one flight
    gate.release.set()
    for thread in threads:
        thread.join(30)
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({r.key for r in results}) == 1
    assert sorted(r.source for r in results) == ["encoder"] + ["shared"] * 7
    assert engine.stats("a").encodes == 1


# ------------------------------------------------------------------------------------------ batching


def test_concurrent_images_form_one_batch(make_engine):
    engine = make_engine(SAMFORGE_MAX_BATCH="4", SAMFORGE_MAX_WAIT_MS="200")
    barrier = threading.Barrier(4)
    images = [png(10 + i) for i in range(4)]

    def embed(i: int):
        barrier.wait()
        return engine.embed("a", images[i])

    results, threads = run_threads(embed, 4)
    for thread in threads:
        thread.join(30)
    assert all(not isinstance(r, Exception) for r in results), results
    assert list(engine.batcher.batch_sizes) == [4]
    assert engine.stats("a").encodes == 4
    # batched features are copied out of the batch tensor: each entry owns exactly its bytes
    assert all(r.value.image_embedding.untyped_storage().nbytes() == TINY_BYTES for r in results)


def test_full_queue_is_overloaded_and_inactive_callers_are_skipped(make_engine):
    engine = make_engine(SAMFORGE_MAX_BATCH="1", SAMFORGE_MAX_WAIT_MS="0", SAMFORGE_QUEUE_SIZE="1")
    gate = Gate(engine.base)
    first, first_threads = run_threads(lambda i: engine.embed("a", png(20)), 1)
    assert gate.entered.wait(30)  # the batcher is busy with the first image
    gone, gone_threads = run_threads(lambda i: engine.embed("a", png(21), is_active=lambda: False), 1)
    wait_for(lambda: engine.batcher.depth() == 1)
    with pytest.raises(Overloaded):
        engine.embed("a", png(22))
    assert engine.stats("a").queue_depth == 1
    gate.release.set()
    for thread in first_threads + gone_threads:
        thread.join(30)
    assert not isinstance(first[0], Exception)
    assert isinstance(gone[0], Cancelled)  # nobody waited for it any more: skipped, not encoded
    assert engine.stats("a").encodes == 1


# ------------------------------------------------------------------------------------------- caches


def test_l1_byte_budget_evicts_least_recently_used(make_engine):
    engine = make_engine(SAMFORGE_CACHE_BYTES=str(3 * TINY_BYTES))
    keys = [engine.embed("a", png(30 + i)).key for i in range(4)]
    stats = engine.stats("a")
    assert (stats.cache_entries, stats.cache_bytes, stats.evictions) == (3, 3 * TINY_BYTES, 1)
    assert stats.cache_budget_bytes == 3 * TINY_BYTES
    with pytest.raises(NotFound):
        engine.get("a", keys[0])
    engine.get("a", keys[1])


def test_tiled_entry_is_one_cache_entry_and_streams_back_exactly(make_engine):
    engine = make_engine()
    result = engine.embed("a", png(40, 150, 300), tiling=TilingRequest(tile_size=128, overlap=32))
    value = result.value
    assert isinstance(value, TiledEmbedding) and len(value.tiles) == 6
    assert engine.stats("a").cache_entries == 1 and engine.stats("a").cache_bytes == 7 * TINY_BYTES == value.nbytes
    back = embedding_from_chunks(embedding_chunks(result.key, engine.get("a", result.key), chunk_bytes=5000))
    assert isinstance(back, TiledEmbedding) and back.origins == value.origins
    for mine, theirs in zip([back.whole, *back.tiles], [value.whole, *value.tiles], strict=True):
        assert torch.equal(mine.image_embedding, theirs.image_embedding)
        assert (mine.original_size, mine.input_size) == (theirs.original_size, theirs.input_size)


def test_l2_serves_a_second_engine_without_encoding(make_engine):
    redis = FakeRedis()
    first = make_engine(l2=RedisL2(client=redis))
    computed = first.embed("a", png(50))
    assert len(redis.data) == 1
    second = make_engine(l2=RedisL2(client=redis))
    served = second.embed("a", png(50))
    assert served.cached and served.source == "l2" and served.key == computed.key
    assert torch.equal(served.value.image_embedding, computed.value.image_embedding)
    assert second.stats("a").encodes == 0 and second.stats("a").l2_hits == 1
    third = make_engine(l2=RedisL2(client=redis))
    via_l2 = third.get("a", computed.key)  # GetEmbedding via L2
    assert torch.equal(via_l2.image_embedding, computed.value.image_embedding)
    with pytest.raises(NotFound):
        third.get("b", computed.key)
    blob = next(iter(redis.data.values()))
    with pytest.raises(ValueError):
        decode_entry(blob, "f" * 64, "a")  # stored under another key: never silently reused
    assert b"pickle" not in blob[:200] and blob[8:9] == b"{"  # safetensors header, JSON metadata


def test_redis_down_is_not_an_error(make_engine):
    l2 = RedisL2(f"redis://127.0.0.1:{free_port()}/0", 60, timeout=0.5)  # nobody listens there
    engine = make_engine(l2=l2)
    assert not engine.embed("a", png(60)).cached
    assert engine.embed("a", png(60)).cached
    assert l2.errors >= 1


def test_codec_rejects_malformed_streams(make_engine):
    engine = make_engine()
    result = engine.embed("a", png(70))
    chunks = list(embedding_chunks(result.key, result.value, chunk_bytes=1000))
    assert len(chunks) == 9 and all(len(c.data) <= 1000 for c in chunks)
    assert chunks[0].total_bytes == TINY_BYTES and not chunks[1].HasField("info")
    back = embedding_from_chunks(iter(chunks))
    assert isinstance(back, Embedding) and torch.equal(back.image_embedding, result.value.image_embedding)
    for broken in ([], chunks[1:], chunks[:-1]):
        with pytest.raises(MalformedEmbeddingStream):
            embedding_from_chunks(broken)
    assert len(encode_entry(result.key, "a", result.value)) > TINY_BYTES


# ------------------------------------------------------------------------------------------ adapters


def _artifact(model, method: str, folder, seed: int):
    return save_perturbed_adapter(model, method, folder, seed=seed, name=f"{method}{seed}")


@pytest.fixture()
def store(tmp_path, tiny_model):
    store = FileSystemAdapterStore(tmp_path / "registry")
    store.publish("t", "a", _artifact(tiny_model, "lora", tmp_path / "a", 1))
    store.publish("t", "b", _artifact(tiny_model, "adapter", tmp_path / "b", 2))
    store.publish("t", "dec", _artifact(tiny_model, "decoder", tmp_path / "dec", 3))
    return store


def test_adapter_lru_evicts_before_loading(make_engine, store, monkeypatch):
    engine = make_engine(store=store, SAMFORGE_ADAPTER_CACHE="1")
    resident_at_load: list[int] = []
    real = adapter_models.load_adapter

    def counting(model, path):
        resident_at_load.append(len(engine.adapters.loaded()))
        return real(model, path)

    monkeypatch.setattr(adapter_models, "load_adapter", counting)
    results = [engine.embed("t", png(80 + i), adapter=ref) for i, ref in enumerate(["a", "b", "a", "b:1"])]
    assert engine.adapters.loads == 4 and resident_at_load == [0, 0, 0, 0]
    assert engine.stats("t").loaded_adapters == ["t/b:1"]
    ids = {r.value.encoder_adapter for r in results}
    assert len(ids) == 2 and None not in ids
    assert engine.embed("t", png(80), adapter="a").cached  # a cache hit never loads the adapter
    assert engine.adapters.loads == 4
    base = engine.embed("t", png(80))
    assert base.key != results[0].key and base.value.encoder_adapter is None
    # a decoder-only adapter shares the base encoder and the base key; nothing is loaded
    shared = engine.embed("t", png(80), adapter="dec")
    assert shared.cached and shared.key == base.key and engine.adapters.loads == 4
    with pytest.raises(NotFound):
        engine.embed("t", png(80), adapter="missing")
    with pytest.raises(NotFound):
        engine.embed("other", png(80), adapter="a")  # another tenant's adapter does not exist for you
    with pytest.raises(InvalidInput):
        engine.embed("t", png(80), adapter="../a")


def test_invalid_artifact_fails_while_the_loaded_version_keeps_serving(make_engine, store, tmp_path):
    engine = make_engine(store=store, SAMFORGE_ADAPTER_CACHE="1")
    engine.embed("t", png(90), adapter="a:1")
    v2 = store.publish("t", "a", _artifact(build_tiny(), "lora", tmp_path / "a2", 4))
    weights = v2.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # changed on disk after publishing
    with pytest.raises(AdapterInvalid):
        engine.embed("t", png(91), adapter="a:2")
    other_base = build_tiny(seed=7)  # trained on another base model: rejected before anything is evicted
    store.publish("t", "w", _artifact(other_base, "lora", tmp_path / "w", 5))
    with pytest.raises(AdapterInvalid):
        engine.embed("t", png(91), adapter="w")
    assert engine.stats("t").loaded_adapters == ["t/a:1"]
    assert not engine.embed("t", png(92), adapter="a:1").cached
    assert engine.adapters.loads == 1


def test_alias_moves_are_picked_up_without_restart(make_engine, store, tmp_path, tiny_model):
    store.publish("t", "a", _artifact(tiny_model, "lora", tmp_path / "a2", 6))
    store.promote("t", "a", "prod", 1)
    engine = make_engine(store=store)
    first = engine.embed("t", png(100), adapter="a@prod").value.encoder_adapter
    assert first == engine.embed("t", png(101), adapter="a:1").value.encoder_adapter
    store.promote("t", "a", "prod", 2)
    second = engine.embed("t", png(102), adapter="a:2").value.encoder_adapter
    wait_for(lambda: engine.adapters.resolve("t", "a@prod").encoder_adapter == second)
    moved = engine.embed("t", png(100), adapter="a@prod")
    assert not moved.cached and moved.value.encoder_adapter == second != first


# ----------------------------------------------------------------------- isolation and bounded queue


def poisoned_encoder(predictor: Predictor, poison: np.ndarray):
    """``predictor.encode_tensor`` failing any batch that holds ``poison`` (a test double for a failure only)."""
    bad = preprocess(poison, predictor.spec)[0][0]
    real = predictor.encode_tensor
    calls: list[int] = []

    def encode_tensor(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        if any(torch.equal(row, bad) for row in batch):
            raise RuntimeError("injected encoder fault")
        return real(batch)

    predictor.encode_tensor = encode_tensor
    return calls


def test_a_failing_image_fails_alone_and_its_batch_neighbours_from_another_tenant_embed(make_engine):
    """Tenant a's 3 images and tenant b's failing one arrive together: one batch of 4 whose encoder call fails.
    Only b's request fails; a's three get their embeddings (they all failed with b's error before)."""
    engine = make_engine(SAMFORGE_MAX_BATCH="4", SAMFORGE_MAX_WAIT_MS="3000")
    poison = np.full((48, 64, 3), 7, np.uint8)
    calls = poisoned_encoder(engine.base, poison)
    out = io.BytesIO()
    Image.fromarray(poison).save(out, format="PNG")
    requests = [("a", png(200)), ("a", png(201)), ("b", out.getvalue()), ("a", png(202))]
    barrier = threading.Barrier(4)

    def embed(i: int):
        barrier.wait()
        return engine.embed(*requests[i])

    results, threads = run_threads(embed, 4)
    for thread in threads:
        thread.join(60)
    assert calls[0] == 4  # they did share one encoder call
    assert isinstance(results[2], RuntimeError), results[2]
    assert [type(results[i]) for i in (0, 1, 3)] == [type(results[0])] * 3 and results[0].source == "encoder"


def flat_png(seed: int, height: int, width: int) -> bytes:
    """A distinct, highly compressible PNG (fast to write and read at 12 Mpx)."""
    array = np.zeros((height, width, 3), np.uint8)
    array[seed % height] = 255
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def test_queued_requests_hold_the_resized_image_not_the_decoded_upload(make_engine):
    """4 requests of 4000x3000 images (36 MB each decoded) wait for a busy encoder: the memory they hold is the
    images resized to the model's input (tiny: 96 x 128 x 3 bytes each), not 4 x 36 MB as before."""
    engine = make_engine(SAMFORGE_MAX_BATCH="1", SAMFORGE_MAX_WAIT_MS="0")
    gate = Gate(engine.base)
    uploads = [flat_png(i, 3000, 4000) for i in range(4)]
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        results, threads = run_threads(lambda i: engine.embed("a", uploads[i]), 4)
        assert gate.entered.wait(30)
        wait_for(lambda: engine.batcher.depth() == 3)
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
        gate.release.set()
        for thread in threads:
            thread.join(60)
    assert all(not isinstance(r, Exception) for r in results), results
    assert held < 3000 * 4000 * 3, f"{held / 1e6:.1f} MB held by 4 waiting requests"


def test_queue_bytes_bound_refuses_at_once(make_engine):
    resized = 96 * 128 * 3  # a 48 x 64 image at the tiny model's 128 px input
    engine = make_engine(SAMFORGE_MAX_BATCH="1", SAMFORGE_MAX_WAIT_MS="0", SAMFORGE_QUEUE_BYTES=str(5 * resized // 2))
    gate = Gate(engine.base)
    results, threads = run_threads(lambda i: engine.embed("a", png(210 + i)), 2)
    assert gate.entered.wait(30)
    wait_for(lambda: engine.batcher.depth() == 1)  # one being encoded, one queued: 2 images held
    try:
        with pytest.raises(Overloaded, match="SAMFORGE_QUEUE_BYTES"):
            engine.embed("a", png(212))
    finally:
        gate.release.set()
        for thread in threads:
            thread.join(60)
    assert all(not isinstance(r, Exception) for r in results), results
    assert not engine.embed("a", png(212)).cached


def test_two_large_decodes_with_a_budget_for_one_run_one_at_a_time(make_engine, monkeypatch):
    """SAMFORGE_DECODE_BYTES holds one 48 x 64 image's decode (10 bytes a pixel): while the first request holds
    its decoded image (stopped in its resize), the second waits before decoding; the peak held is one image."""
    one_image = 10 * 48 * 64
    engine = make_engine(SAMFORGE_MAX_PIXELS=str(48 * 64), SAMFORGE_DECODE_BYTES=str(one_image))
    resizing, resume = threading.Event(), threading.Event()
    real_prepare = engine_module._prepare

    def gated_prepare(predictor, image):
        if not resizing.is_set():
            resizing.set()
            assert resume.wait(30)
        return real_prepare(predictor, image)

    monkeypatch.setattr(engine_module, "_prepare", gated_prepare)
    results, threads = run_threads(lambda i: engine.embed("a", png(300 + i), time_remaining=30.0), 2)
    try:
        assert resizing.wait(30)
        wait_for(lambda: engine.decode_budget.waiting == 1)  # the second request waits for the budget
        assert engine.decode_budget.held == one_image
    finally:
        resume.set()
        for thread in threads:
            thread.join(60)
    assert all(not isinstance(r, Exception) for r in results), results
    assert engine.decode_budget.peak == one_image and engine.decode_budget.held == 0


def test_a_decode_that_cannot_start_before_the_deadline_is_overloaded(make_engine):
    engine = make_engine(SAMFORGE_MAX_PIXELS=str(48 * 64), SAMFORGE_DECODE_BYTES=str(10 * 48 * 64))
    with engine.decode_budget.hold(1, timeout=None):  # another request's decode holds part of the budget
        with pytest.raises(Overloaded, match=r"SAMFORGE_DECODE_BYTES.*retry after ~\d+ s"):
            engine.embed("a", png(310), time_remaining=0.05)
    assert engine.decode_budget.held == 0
    assert not engine.embed("a", png(310), time_remaining=5.0).cached  # and the engine still serves
