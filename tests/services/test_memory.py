"""services.common.memory: the budget arithmetic and the start-up measurement of the encoder's working set."""

from __future__ import annotations

import mmap

from services.common.memory import (
    DECODE_BYTES_PER_PIXEL,
    decoder_budget,
    encoder_budget,
    encoder_settings_budget,
    measure_encode_bytes,
    transfer_bytes,
)
from services.common.settings import EncoderSettings


def test_encoder_budget_is_cache_plus_queue_plus_batches_plus_requests_plus_decode():
    settings = EncoderSettings.from_env({"SAMFORGE_CACHE_BYTES": str(64 << 20)})
    budget = encoder_budget(cache_bytes=settings.cache_bytes, queue_bytes=settings.queue_bytes, max_batch=4,
                            concurrency=2, encode_bytes_per_image=100, workers=8, max_image_bytes=10, decode_bytes=50)
    assert budget.terms == {"cache": 64 << 20, "queue": settings.queue_bytes, "encode": 800, "requests": 8 * 20,
                            "decode": 50}
    assert budget.total == sum(budget.terms.values()) and "MiB" in budget.describe()
    on_gpu = encoder_budget(cache_bytes=1 << 30, queue_bytes=1, max_batch=1, concurrency=1, encode_bytes_per_image=1,
                            workers=1, max_image_bytes=1, decode_bytes=1, cache_on_host=False)
    assert on_gpu.terms["cache"] == 0  # the cache is GPU memory there


def test_the_encoder_budget_with_default_settings_is_under_3_5_gb():
    """Defaults (1 GiB cache, 8 workers, 64 Mpx images) with LiteMedSAM's measured 220 MB working set per image:
    image decoding counts one SAMFORGE_DECODE_BYTES (one 64 Mpx image), not one 64 Mpx image per worker."""
    settings = EncoderSettings.from_env({})
    budget = encoder_settings_budget(settings, encode_bytes_per_image=220_000_000)
    assert budget.terms["decode"] == settings.decode_bytes == DECODE_BYTES_PER_PIXEL * settings.max_pixels
    assert budget.terms["requests"] == settings.workers * 2 * settings.max_image_bytes
    assert budget.total < 3_500_000_000, budget.describe()


def test_decoder_budget_counts_max_prompts_low_res_logits_and_full_resolution_masks():
    budget = decoder_budget(cache_bytes=1000, max_prompts=256, low_res_size=256, max_pixels=1 << 20,
                            pixel_budget=1 << 24, workers=8, max_image_bytes=10, max_message_bytes=20)
    assert budget.terms == {"cache": 1000, "decode": 256 * 3 * 256 * 256 * 4 + (1 << 24) + 3 * (1 << 20) * 4,
                            "requests": 8 * 30}


def touch_fresh_pages(size: int) -> None:
    """Map and write ``size`` new bytes (fresh pages: no allocator can serve them from memory it kept)."""
    with mmap.mmap(-1, size) as block:
        block.write(b"\1" * size)


def test_measured_encode_bytes_see_the_allocation():
    measured = measure_encode_bytes(lambda: touch_fresh_pages(64 << 20))
    assert measured is not None and measured >= 60 << 20
    assert transfer_bytes(256, [(256, 64, 64)]) == 2 * (3 * 256 * 256 * 4 + 256 * 64 * 64 * 4)
