"""`samforge predict` end to end through the console entry point (tiny model, in-process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sam_core.io.masks import decode_png
from services.cli import main


@pytest.fixture()
def image_path(tmp_path, scene):
    path = tmp_path / "scene.png"
    Image.fromarray(scene[0]).save(path)
    return path


def test_predict_writes_masks_and_prints_summary(image_path, tmp_path, capsys):
    out = tmp_path / "out" / "mask.png"
    code = main(["predict", "--image", str(image_path), "--model", "tiny", "--box", "10,10,100,90",
                 "--box", "150,60,300,200", "--point", "50,50", "--point", "5,5,0", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_id"].startswith("tiny-") and summary["image_size"] == [240, 320]
    assert len(summary["prompts"]) == 3 and set(summary["timing_ms"]) >= {"encode", "decode"}
    assert len(summary["outputs"]) == 4
    union = decode_png(out.read_bytes())
    parts = [decode_png(open(p, "rb").read()) for p in summary["outputs"][1:]]
    np.testing.assert_array_equal(union, np.logical_or.reduce(parts))
    assert [int(p.sum()) for p in parts] == [p["area"] for p in summary["prompts"]]


def test_predict_tiled(image_path, tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["predict", "--image", str(image_path), "--model", "tiny", "--tile", "--box", "10,10,60,60",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["tiled"] is True


def test_bad_input_is_a_clear_error(image_path, tmp_path, capsys):
    assert main(["predict", "--image", str(image_path), "--model", "tiny", "--box", "10,10,9000,60",
                 "--out", str(tmp_path / "m.png")]) == 2
    assert "prompts[0].box" in capsys.readouterr().err
    assert main(["predict", "--image", str(tmp_path / "missing.png"), "--model", "tiny", "--box", "1,1,2,2",
                 "--out", str(tmp_path / "m.png")]) == 2
    with pytest.raises(SystemExit):
        main(["predict", "--image", str(image_path), "--box", "1,2,3", "--out", "x.png"])


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_export_onnx_checks_against_pytorch(image_path, tmp_path, capsys, part):
    pytest.importorskip("onnxruntime")
    out = tmp_path / f"{part}.onnx"
    code = main(["export-onnx", "--part", part, "--model", "tiny", "--out", str(out), "--check-image", str(image_path)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["part"] == part and summary["bytes"] == out.stat().st_size > 0
    assert summary["mask_iou_min"] >= 0.99
    if part == "encoder":
        assert summary["embedding_max_abs_error"] < 1e-4


@pytest.mark.parametrize("model", ["tiny", "tiny_sam2"])
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_export_onnx_report_is_the_same_for_every_family(image_path, tmp_path, capsys, model, part):
    """Per-level max |ONNX - PyTorch| (every feature level of the family), low-res logit and IoU differences,
    mask IoU agreement and both runtimes' timings, for SAM 1 and SAM 2 alike."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / f"{part}.onnx"
    assert main(["export-onnx", "--part", part, "--model", model, "--out", str(out),
                 "--check-image", str(image_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    levels = ["image_embed"] if model == "tiny" else ["image_embed", "high_res_feat_s0", "high_res_feat_s1"]
    assert summary["model_id"].startswith(f"{model}-") and summary["bytes"] == out.stat().st_size
    assert summary["mask_iou_min"] >= 0.99
    assert summary["low_res_max_abs_error"] < 1e-4 and summary["iou_max_abs_error"] < 1e-4
    assert set(summary["timing_ms"]) == {"torch", "onnx"} and min(summary["timing_ms"].values()) > 0
    if part == "encoder":
        assert list(summary["max_abs_error"]) == levels
        assert max(summary["max_abs_error"].values()) == summary["embedding_max_abs_error"] < 1e-4
