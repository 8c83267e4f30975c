"""The soak benchmark (bench/soak.py): its pure parts, and a short run of the whole harness.

* the plateau verdict, the declared budget (gauge or fallback), the RSS of a process tree, the distinct image
  source and the result file name, without servers;
* a ~12 s soak of 2 users on the ``tiny`` model and generated images (the harness's mechanics: stack start,
  warm-up, locust users over real gRPC, RSS sampling, the JSON), run as its own process because locust
  monkey-patches the standard library of the process that imports it. It must report every field, requests
  of each RPC, no unexpected error and all images distinct.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.soakparts.images import ImageSource, session_plan
from bench.soakparts.memory import BUDGET_GAUGE, declared_budget, plateau, process_rss_bytes, tree_rss_bytes
from bench.soakparts.report import cpu_slug, result_path

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def ramp_then(values_after: list[int], start: float = 0.0) -> list[tuple[float, int]]:
    """A series: 10 samples rising from 100 to 190 MiB in the first third, then ``values_after`` one a second."""
    ramp = [(start + i, (100 + 10 * i) * MIB) for i in range(10)]
    return ramp + [(start + 10 + i, v) for i, v in enumerate(values_after)]


def test_plateau_when_the_last_third_stays_at_the_middle_level() -> None:
    series = ramp_then([200 * MIB] * 10 + [205 * MIB] * 10)
    result = plateau(series, 0.0, 29.0, tolerance=0.05)
    assert result["verdict"] == "plateau"
    assert result["middle_third_max_bytes"] == 200 * MIB and result["last_third_max_bytes"] == 205 * MIB


def test_growing_when_the_last_third_climbs_above_the_tolerance() -> None:
    series = ramp_then([(200 + 2 * i) * MIB for i in range(20)])  # a leak: +2 MiB a second
    result = plateau(series, 0.0, 29.0, tolerance=0.05)
    assert result["verdict"] == "growing"
    assert result["slope_mib_per_min_last_two_thirds"] == pytest.approx(120, rel=0.01)


def test_plateau_ignores_samples_outside_the_load_window() -> None:
    series = ramp_then([200 * MIB] * 20) + [(40.0, 900 * MIB)]  # after the load: not judged
    assert plateau(series, 0.0, 29.0, tolerance=0.05)["verdict"] == "plateau"


def test_inconclusive_while_the_cache_is_still_filling_at_the_middle_third() -> None:
    series = ramp_then([(200 + 2 * i) * MIB for i in range(20)])
    filling = [(float(t), min(64, 4 * t) * MIB) for t in range(30)]  # 64 MiB reached at t = 16 > 10
    result = plateau(series, 0.0, 29.0, tolerance=0.05, cache=filling, cache_setting=64 * MIB)
    assert result["verdict"] == "inconclusive" and result["cache_still_filling_at_middle_third"]
    full = [(float(t), min(64, 8 * t) * MIB) for t in range(30)]  # full at t = 8 < 10: judged
    assert plateau(series, 0.0, 29.0, tolerance=0.05, cache=full, cache_setting=64 * MIB)["verdict"] == "growing"


def test_no_verdict_without_samples_in_a_third() -> None:
    assert plateau([(0.0, MIB), (1.0, MIB)], 0.0, 30.0, tolerance=0.05)["verdict"] is None


def test_budget_is_the_gauge_summed_over_its_labels_else_the_fallback_named() -> None:
    gauge = {BUDGET_GAUGE: [({"part": "cache"}, 64.0 * MIB), ({"part": "working_set"}, 100.0 * MIB)]}
    assert declared_budget(gauge, 1, "SAMFORGE_CACHE_BYTES")["bytes"] == 164 * MIB
    fallback = declared_budget({}, 64 * MIB, "SAMFORGE_CACHE_BYTES")
    assert fallback["bytes"] == 64 * MIB and "SAMFORGE_CACHE_BYTES" in fallback["source"]
    assert declared_budget({}, None, "")["bytes"] is None


def test_tree_rss_includes_child_processes() -> None:
    code = "import sys; block = bytearray(64 << 20); block[::4096] = b'x' * len(block[::4096]); " \
           "print(1, flush=True); sys.stdin.readline()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"1"  # its 64 MiB are touched
        assert process_rss_bytes(child.pid) > 64 * MIB
        assert tree_rss_bytes(os.getpid()) - process_rss_bytes(os.getpid()) > 60 * MIB
    finally:
        child.communicate(b"\n", timeout=30)
    assert process_rss_bytes(child.pid) == 0  # reaped: gone


def test_generated_images_are_distinct_and_reproducible(tmp_path: Path) -> None:
    source = ImageSource("generated", seed=3, data=tmp_path)
    images = [source.encoded(i)[0] for i in range(12)]
    assert len(set(images)) == 12 and source.sent == 12
    assert ImageSource("generated", seed=3, data=tmp_path).encoded(5)[0] == images[5]


def test_a_repeated_draw_is_replaced_by_a_fresh_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = ImageSource("generated", seed=0, data=tmp_path)
    fixed = np.full((64, 64, 3), 7, np.uint8)
    real_image = source.image
    monkeypatch.setattr(source, "image", lambda index, attempt=0: fixed if attempt == 0 else real_image(index, attempt))
    first, second = source.encoded(0)[0], source.encoded(1)[0]
    assert first != second and source.redrawn == 1


def test_real_images_are_required_when_asked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ImageSource("real", seed=0, data=tmp_path)
    assert ImageSource("auto", seed=0, data=tmp_path).kind == "generated"


def test_session_plans_stay_inside_the_image_and_within_the_prompt_limit() -> None:
    for index in range(50):
        plan = session_plan(0, index, 300, 400, max_prompts=4, everything_probability=0.5)
        assert 1 <= len(plan.segments) <= 3
        for prompts in plan.segments:
            assert 1 <= len(prompts) <= 4
            for p in prompts:
                assert p.box is not None or p.points
                assert all(0 <= x <= 400 and 0 <= y <= 300 for x, y, _ in p.points)


def test_result_file_is_named_by_date_and_cpu(tmp_path: Path) -> None:
    assert cpu_slug("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == "intel-xeon-platinum-8375c-cpu"
    assert result_path(tmp_path, "2026-12-06", "AMD EPYC 7B13") == tmp_path / "soak-2026-12-06-amd-epyc-7b13.json"


@pytest.mark.slow
@pytest.mark.integration
def test_short_soak_reports_every_field_and_no_unexpected_error(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--users", "2", "--minutes", "0.2", "--model", "tiny",
               "--images", "generated", "--sample-seconds", "1", "--warmup-sessions", "1", "--everything-points", "2",
               "--everything-probability", "0.5", "--think-seconds", "0.2", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("soak-*.json")
    result = json.loads(path.read_text())
    assert path.with_suffix(".md").exists() and "| Embed |" in proc.stdout
    requests = result["requests"]
    assert requests["unexpected_errors"] == 0 and result["harness_exceptions"] == 0, requests["errors"]
    assert result["max_calls_in_flight"] == 2  # both users' gRPC calls overlapped: the stubs yield under gevent
    for rpc in ("Embed", "Segment", "SegmentEverything"):
        figures = requests["rpcs"][rpc]
        assert figures["requests"] > 0 and figures["rps"] > 0 and figures["p99_ms"] >= figures["p50_ms"] > 0, rpc
    assert requests["total"]["requests"] == sum(r["requests"] for r in requests["rpcs"].values())
    assert result["images"]["sent"] >= requests["rpcs"]["Embed"]["requests"] and result["images"]["kind"] == "generated"
    start, end = result["load_window_s"]
    assert end - start >= 12
    for name in ("encoder", "decoder", "trainer"):
        memory = result["memory"][name]
        assert memory["base_bytes"] > 0 and memory["peak_bytes"] >= memory["base_bytes"] > 0
        assert len([t for t, _ in memory["series"] if start <= t <= end]) >= 6
        assert memory["plateau"]["verdict"] in ("plateau", "growing", "inconclusive")
    for name in ("encoder", "decoder"):
        assert result["memory"][name]["budget"]["bytes"] is not None and result["memory"][name]["cache_series"]
    assert result["caches"]["encoder"]["samforge_encodes_total"][0]["value"] >= requests["rpcs"]["Embed"]["requests"]
    assert result["exit_codes"] == {"trainer": 0, "encoder": 0, "decoder": 0}
    assert {"cpu_model", "cores", "allocator"} <= set(result["machine"])
    assert {"python", "torch", "grpcio", "locust", "samforge_commit"} <= set(result["versions"])
