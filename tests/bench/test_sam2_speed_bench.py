"""The SAM 2.1 speed benchmark's harness (bench/sam2_speed.py) with 2 boxes and one repeat: every variant is
timed, the ratios are against the named baselines, samforge's masks equal the official predictor's."""

from __future__ import annotations

import argparse

import pytest

from bench.sam2_speed import DECODE, ENCODE, markdown, measure


@pytest.mark.slow
def test_sam2_bench_times_every_variant_against_its_baseline():
    result = measure(argparse.Namespace(repeats=1, prompts=2, threads=1, synthetic=True))
    assert list(result["encode"]) == list(ENCODE) and list(result["decode"]) == list(DECODE)
    assert all(row["wall_s"] > 0 and row["cpu_s"] > 0 for row in [*result["encode"].values(),
                                                                    *result["decode"].values()])
    assert result["encode_ratio"][ENCODE[1]] == {"wall": 1.0, "cpu": 1.0}
    assert result["decode_ratio_vs_loop"][DECODE[2]]["wall"] == 1.0
    assert result["decode_ratio_vs_batched"][DECODE[3]]["wall"] == 1.0
    assert result["mask_iou_vs_official_min"] > 0.99
    assert set(result["avx512_bf16"]) >= {"avx512f", "avx512_bf16"}
    result.update(cpu="test", torch="x", threads=1)
    text = markdown(result)
    assert all(name in text for name in (*ENCODE, *DECODE)) and "random weights" in text
