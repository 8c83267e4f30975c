"""The frozen-prefix cache benchmark's harness (bench/prefix_cache_speed.py) on the ``tiny`` model and
synthetic images: both variants run interleaved, every field is reported, the losses agree."""

from __future__ import annotations

import argparse

import pytest

from bench.prefix_cache_speed import markdown, measure


@pytest.mark.slow
def test_prefix_cache_bench_reports_both_variants(tmp_path) -> None:
    args = argparse.Namespace(model="tiny", method="lora", data=str(tmp_path / "absent"), images=3, batch=1,
                              repeats=1)
    result = measure(args)
    assert result["data"].startswith("synthetic") and result["images"] == 3
    assert [len(result["runs"][v]) for v in ("uncached", "cached")] == [1, 1]
    assert result["runs"]["cached"][0]["fill_s"] > 0 and result["runs"]["uncached"][0]["fill_s"] == 0
    assert len(result["runs"]["cached"][0]["losses"]) == result["instances"]  # batch 1: a step per instance
    assert result["max_loss_difference"] <= 1e-6 and result["epoch_ratio"] > 0 and result["step_ratio"] > 0
    result.update(cpu="test", torch="x", threads=1)
    assert "step ratio" in markdown(result)
