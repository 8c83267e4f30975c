"""DynamicBatcher with a real tiny Predictor: per-job failure isolation and admission (bytes, deadline)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from sam_core.errors import ImageTooLarge, Overloaded
from sam_core.inference.predictor import Predictor
from sam_core.modeling.preprocess import model_input
from services.encoder.batcher import DynamicBatcher, EncodeJob, TiledImage

POISON = 7  # every pixel of the image the fault injector fails on


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pixels(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


class FaultyEncoder:
    """A real tiny encoder that fails any call whose batch holds the all-``POISON`` image (a test double for a
    failure only); ``held`` (set by the test) blocks calls until released; ``calls``: the batch sizes it saw."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        poison = predictor.prepare(np.full((48, 64, 3), POISON, np.uint8))
        self.poison = model_input(poison.resized, predictor.spec)[0]
        self.calls: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(batch))
        self.entered.set()
        assert self.release.wait(30)
        if any(torch.equal(row, self.poison) for row in batch):
            raise RuntimeError("injected encoder fault")
        return self.predictor.encode_tensor(batch)


@pytest.fixture()
def faulty(tiny_model):
    encoder = FaultyEncoder(Predictor(tiny_model))
    return encoder, Predictor(tiny_model, encoder_fn=encoder)


@pytest.fixture()
def batchers():
    made: list[DynamicBatcher] = []

    def make(**kwargs) -> DynamicBatcher:
        made.append(DynamicBatcher(**kwargs))
        return made[-1]

    yield make
    for batcher in made:
        batcher.close()


def test_one_failing_job_fails_alone_and_its_batch_neighbours_get_their_embeddings(faulty, batchers, tiny_model):
    encoder, predictor = faulty
    batcher = batchers(max_batch=4, max_wait_s=5.0)
    images = [pixels(1), pixels(2), np.full((48, 64, 3), POISON, np.uint8), pixels(3)]
    futures = [batcher.submit(EncodeJob(predictor, predictor.prepare(image))) for image in images]
    with pytest.raises(RuntimeError, match="injected"):
        futures[2].result(timeout=60)
    reference = Predictor(tiny_model)
    for index in (0, 1, 3):
        embedding, _ = futures[index].result(timeout=60)
        assert torch.allclose(embedding.image_embedding, reference.encode_one(images[index]).image_embedding, atol=1e-5)
    assert encoder.calls == [4, 1, 1, 1, 1]  # the batch of 4 failed; each job again alone
    assert batcher.encodes == 3 and (batcher.held_bytes, batcher.held_images) == (0, 0)


def test_queue_bytes_bound_refuses_with_a_retry_hint_and_counts_jobs_until_encoded(faulty, batchers):
    encoder, predictor = faulty
    item = predictor.prepare(pixels(10))
    batcher = batchers(max_batch=1, max_wait_s=0.0, queue_bytes=2 * item.nbytes + 1)
    encoder.release.clear()
    first = batcher.submit(EncodeJob(predictor, item))
    assert encoder.entered.wait(30)  # being encoded: still held
    second = batcher.submit(EncodeJob(predictor, predictor.prepare(pixels(11))))
    with pytest.raises(Overloaded, match=r"SAMFORGE_QUEUE_BYTES=\d+; retry after ~\d+ s"):
        batcher.submit(EncodeJob(predictor, predictor.prepare(pixels(12))))
    assert batcher.held_bytes == 2 * item.nbytes <= batcher.queue_bytes
    tiled = TiledImage(pixels(13, 160, 200), 64, 16)  # full size, over the whole bound: can never fit
    with pytest.raises(ImageTooLarge) as info:
        batcher.submit(EncodeJob(predictor, tiled))
    assert info.value.field == "image"
    encoder.release.set()
    first.result(timeout=60)
    second.result(timeout=60)
    assert batcher.held_bytes == 0
    batcher.submit(EncodeJob(predictor, predictor.prepare(pixels(12)))).result(timeout=60)


def test_deadline_admission_refuses_what_cannot_finish_in_time(faulty, batchers):
    encoder, predictor = faulty
    batcher = batchers(max_batch=1, max_wait_s=0.0)
    unmeasured = batcher.submit(EncodeJob(predictor, predictor.prepare(pixels(20))), time_remaining=1e-9)
    unmeasured.result(timeout=60)  # no measurement yet: admitted whatever the deadline
    per_image = batcher.seconds_per_image
    assert per_image is not None and per_image > 0
    encoder.release.clear()
    busy = [batcher.submit(EncodeJob(predictor, predictor.prepare(pixels(21 + i)))) for i in range(3)]
    assert encoder.entered.wait(30)
    estimate = 4 * per_image  # 3 held + this one
    with pytest.raises(Overloaded, match=r"estimated wait .* exceeds the request deadline .* retry after ~\d+ s"):
        batcher.submit(EncodeJob(predictor, predictor.prepare(pixels(30))), time_remaining=estimate / 2)
    patient = batcher.submit(EncodeJob(predictor, predictor.prepare(pixels(31))), time_remaining=estimate * 100)
    no_deadline = batcher.submit(EncodeJob(predictor, predictor.prepare(pixels(32))))
    encoder.release.set()
    for future in [*busy, patient, no_deadline]:
        future.result(timeout=60)
    assert batcher.encodes == 6
