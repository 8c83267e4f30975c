"""Evaluation loop, comparison table, report files and plots on a tiny synthetic folder data set."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from sam_core.data.dataset import load_dataset
from sam_core.data.prompt_sim import PromptConfig
from sam_core.errors import InvalidInput
from sam_core.evaluation.evaluate import (
    EvalConfig,
    compare,
    eval_cache_key,
    evaluate,
    evaluate_fn,
    format_table,
    write_report,
)
from sam_core.evaluation.plots import crop_box, plot_training_curves
from sam_core.inference.predictor import Predictor

H, W = 96, 128
# (cx, cy, rx, ry) per blob; blobs are far apart so their boxes never overlap
BLOBS = {
    "img_a": [(30, 30, 12, 9)],
    "img_b": [(25, 25, 10, 10), (95, 65, 14, 8)],
    "img_c": [(20, 70, 6, 6), (64, 20, 9, 12), (105, 72, 3, 3)],
}
N_INSTANCES = sum(len(b) for b in BLOBS.values())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for k, (stem, blobs) in enumerate(BLOBS.items()):
        rng = np.random.default_rng(k)
        image = rng.normal(60, 10, (H, W)).clip(0, 120).astype(np.uint8)
        mask = np.zeros((H, W), np.uint8)
        for cx, cy, rx, ry in blobs:
            cv2.ellipse(mask, (cx, cy), (rx, ry), 0, 0, 360, 255, -1)
        image[mask > 0] = 210
        cv2.imwrite(str(root / "images" / f"{stem}.png"), np.repeat(image[..., None], 3, axis=2))
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    return load_dataset(root)


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return Predictor(tiny_model)


def oracle(image: np.ndarray, prompts: list[dict]) -> np.ndarray:
    """Perfect on this data: bright pixels inside each (tight, inclusive) box prompt."""
    bright = image[..., 0] > 160
    out = np.zeros((len(prompts), *bright.shape), bool)
    for i, p in enumerate(prompts):
        x0, y0, x1, y1 = (int(round(v)) for v in p["box"])
        out[i, y0:y1 + 1, x0:x1 + 1] = bright[y0:y1 + 1, x0:x1 + 1]
    return out


def empty(image: np.ndarray, prompts: list[dict]) -> np.ndarray:
    return np.zeros((len(prompts), *image.shape[:2]), bool)


def count_encodes(monkeypatch, predictor) -> list[int]:
    calls: list[int] = []
    original = predictor.encode

    def counting(images, **kwargs):
        calls.append(len(images))
        return original(images, **kwargs)

    monkeypatch.setattr(predictor, "encode", counting)
    return calls


def test_default_eval_prompts_are_exact_boxes():
    cfg = EvalConfig()
    assert cfg.prompt.kind == "box" and cfg.prompt.box_jitter == 0.0 and cfg.prompt.box_jitter_max_px == 0
    with pytest.raises(InvalidInput):
        EvalConfig(max_instances_per_image=0)


def test_perfect_and_empty_segmenters(dataset):
    perfect = evaluate_fn(oracle, dataset, label="oracle", model_id="gt")
    assert len(perfect.scores) == N_INSTANCES
    assert perfect.summary["dice_mean"] == 1.0 and perfect.summary["nsd_mean"] == 1.0
    assert perfect.summary["hd95_mean"] == 0.0 and perfect.model_id == "gt"
    assert set(perfect.per_image) == set(BLOBS) and perfect.per_image["img_c"]["n"] == 3

    nothing = evaluate_fn(empty, dataset, label="empty")
    assert nothing.summary["dice_mean"] == 0.0 and nothing.summary["iou_mean"] == 0.0
    assert nothing.summary["hd95_inf_count"] == N_INSTANCES and math.isnan(nothing.summary["hd95_mean"])
    # inf / nan become null and the result is strict JSON
    data = json.loads(json.dumps(nothing.to_json(), allow_nan=False))
    assert data["scores"][0]["hd95"] is None and data["summary"]["hd95_mean"] is None


def test_worst_cases_are_the_lowest_dice_and_bounded(dataset):
    def half(image, prompts):  # perfect on img_a / img_b, empty on img_c
        return oracle(image, prompts) if len(prompts) < 3 else empty(image, prompts)

    report = evaluate_fn(half, dataset, EvalConfig(keep_worst=2))
    assert len(report.worst) == 2
    assert all(w.image_id == "img_c" and w.dice == 0.0 for w in report.worst)
    assert [w.instance_id for w in report.worst] == [1, 2]  # ties: first seen wins, order kept
    assert report.worst[0].pred.shape == report.worst[0].gt.shape == (H, W)
    assert report.worst[0].prompt["box"] is not None


def test_wrong_mask_shape_is_rejected(dataset):
    with pytest.raises(InvalidInput, match="masks"):
        evaluate_fn(lambda image, prompts: np.zeros((1, H, W), bool), dataset)


def test_prompts_are_seeded_by_image_not_order_or_model(dataset):
    jitter = EvalConfig(prompt=PromptConfig(kind="box+point", box_jitter=0.2, box_jitter_max_px=10), seed=3)

    def recorder(store):
        def segment(image, prompts):
            store.append([{k: np.asarray(v).tolist() for k, v in p.items()} for p in prompts])
            return empty(image, prompts)
        return segment

    first, second, subset, other_seed = [], [], [], []
    evaluate_fn(recorder(first), dataset, jitter)
    evaluate_fn(recorder(second), dataset, jitter)
    evaluate_fn(recorder(subset), dataset.subset(["img_c"]), jitter)
    evaluate_fn(recorder(other_seed), dataset, dataclasses.replace(jitter, seed=4))
    assert first == second
    assert subset[0] == first[2]
    assert other_seed != first


def test_predictor_eval_is_deterministic_and_reuses_embeddings(dataset, predictor, monkeypatch):
    calls = count_encodes(monkeypatch, predictor)
    progress: list[tuple[int, int]] = []
    cache: dict = {}
    a = evaluate(predictor, dataset, label="zero-shot", embeddings=cache, progress=lambda i, n: progress.append((i, n)))
    assert len(calls) == len(dataset) and len(cache) == len(dataset)
    assert eval_cache_key(predictor, "img_a", EvalConfig()) in cache
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert len(a.scores) == N_INSTANCES and a.model_id == predictor.model_id
    assert [(s.image_id, s.instance_id) for s in a.scores] == [
        (stem, i + 1) for stem, blobs in BLOBS.items() for i in range(len(blobs))
    ]

    b = evaluate(predictor, dataset, label="again", embeddings=cache)
    assert len(calls) == len(dataset)  # nothing encoded the second time
    assert 0 < a.encode_seconds < a.seconds and b.encode_seconds == 0.0  # what a cached run saves
    assert [dataclasses.astuple(s) for s in a.scores] == [dataclasses.astuple(s) for s in b.scores]
    assert [w.prompt for w in a.worst] == [w.prompt for w in b.worst]
    # another kind of model sees the very same prompts (keep_worst=8 >= 6 instances keeps them all)
    other = evaluate_fn(oracle, dataset)
    assert len(a.worst) == len(other.worst) == N_INSTANCES
    assert {(w.image_id, w.instance_id): w.prompt for w in a.worst} == {
        (w.image_id, w.instance_id): w.prompt for w in other.worst
    }

    c = evaluate(predictor, dataset, EvalConfig(max_instances_per_image=1, multimask=True))
    assert len(c.scores) == len(dataset) and len(calls) == 2 * len(dataset)


def test_tiled_eval_runs_with_its_own_cache_keys(dataset, predictor):
    cache: dict = {}
    plain = evaluate(predictor, dataset, embeddings=cache)
    tiled = evaluate(predictor, dataset, EvalConfig(tiled=True, tile_overlap=32), embeddings=cache)
    assert len(cache) == 2 * len(dataset)
    assert len(tiled.scores) == N_INSTANCES
    # 96 x 128 images fit in one 128 px tile of the tiny model: tiled == whole-image decode
    assert [s.dice for s in tiled.scores] == pytest.approx([s.dice for s in plain.scores])


def test_compare_and_table(dataset):
    perfect = evaluate_fn(oracle, dataset, label="oracle")
    nothing = evaluate_fn(empty, dataset, label="empty")
    comparison = compare([perfect, nothing])
    assert comparison["baseline"] == "oracle" and comparison["labels"] == ["oracle", "empty"]
    assert comparison["rows"]["empty"]["n_instances"] == N_INSTANCES
    assert comparison["deltas"]["empty"]["dice_mean"] == pytest.approx(-1.0)
    assert "oracle" not in comparison["deltas"]
    table = format_table(comparison)
    assert "| oracle |" in table and "| empty |" in table and "(-1.0000)" in table
    assert table.count("\n") == 4
    with pytest.raises(InvalidInput):
        compare([perfect, perfect])


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 3000


def test_write_report_files(dataset, predictor, tmp_path):
    zero_shot = evaluate(predictor, dataset, label="zero-shot")
    perfect = evaluate_fn(oracle, dataset, label="fine tuned")
    history = {"step": list(range(0, 60, 2)), "loss": list(np.linspace(1.0, 0.2, 30)),
               "val_step": [20, 40, 58], "val_dice": [0.5, 0.7, 0.8]}
    paths = write_report(tmp_path / "out", [zero_shot, perfect], history=history, dataset=dataset)
    data = json.loads(paths["report"].read_text())
    assert [r["label"] for r in data["reports"]] == ["zero-shot", "fine tuned"]
    assert data["reports"][1]["summary"]["dice_mean"] == 1.0
    assert len(data["reports"][0]["scores"]) == N_INSTANCES
    gain = data["comparison"]["deltas"]["fine tuned"]["dice_mean"]
    assert gain == pytest.approx(1.0 - zero_shot.summary["dice_mean"])
    assert data["reports"][0]["config"]["prompt"]["kind"] == "box"
    for key in ("dice_histogram", "training_curves", "worst_cases/zero-shot", "worst_cases/fine tuned"):
        assert paths[key].parent == tmp_path / "out"
        _assert_png(paths[key])
    assert paths["worst_cases/fine tuned"].name == "worst_cases_fine_tuned.png"


def test_plot_inputs_are_checked_and_crops_are_bounded(tmp_path):
    with pytest.raises(InvalidInput):
        plot_training_curves({"step": [0, 1], "loss": [1.0]}, tmp_path / "bad.png")
    _assert_png(plot_training_curves({"step": [0, 1, 2], "loss": [1.0, 0.5, 0.4]}, tmp_path / "c.png"))
    gt = np.zeros((100, 200), bool)
    gt[50, 100] = True  # one pixel
    y0, y1, x0, x1 = crop_box(np.zeros_like(gt), gt)
    assert (y0, y1, x0, x1) == (42, 59, 92, 109)
    assert crop_box(np.zeros_like(gt), np.zeros_like(gt)) == (0, 100, 0, 200)


def _top_level_imports(module) -> set[str]:
    """Root package names imported when the module is imported (``if TYPE_CHECKING:`` blocks skipped)."""
    tree = ast.parse(Path(module.__file__).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_importing_does_not_load_matplotlib():
    import sam_core.evaluation.evaluate
    import sam_core.evaluation.plots

    for module in (sam_core.evaluation.evaluate, sam_core.evaluation.plots):
        imports = _top_level_imports(module)
        assert "numpy" in imports and "matplotlib" not in imports, module.__name__


def big_boxes_only(image: np.ndarray, prompts: list[dict]) -> np.ndarray:
    """Fills box prompts of at least 10 px (exact on square instances), misses everything smaller."""
    out = np.zeros((len(prompts), *image.shape[:2]), bool)
    for i, p in enumerate(prompts):
        x0, y0, x1, y1 = (int(round(v)) for v in p["box"])
        if min(x1 - x0, y1 - y0) >= 10:
            out[i, y0:y1 + 1, x0:x1 + 1] = True
    return out


@pytest.fixture(scope="module")
def speck_dataset(tmp_path_factory):
    from tests.sam_core.test_diagnostics import write_speck_dataset

    return load_dataset(write_speck_dataset(tmp_path_factory.mktemp("specks")))


def test_dice_is_reported_over_all_and_over_resolvable_instances(speck_dataset):
    report = evaluate_fn(big_boxes_only, speck_dataset, img_size=128)
    # per image: one 60 px square (15 px at the 128 px input) and six 1-3 px specks (below 2 px there)
    assert [s.resolvable for s in report.scores[:7]] == [True] + [False] * 6
    assert report.summary["n_resolvable"] == 3 and report.summary["n_instances"] == 21
    assert report.summary["dice_mean"] == pytest.approx(3 / 21)
    assert report.summary["dice_resolvable_mean"] == 1.0
    assert "dice_resolvable_mean" in format_table(compare([report]))
    assert json.loads(json.dumps(report.to_json()))["scores"][1]["resolvable"] is False


def test_resolvable_follows_the_model_input_and_tiling(speck_dataset, predictor):
    one = speck_dataset.subset(["img0"])
    assert evaluate(predictor, one).summary["n_resolvable"] == 1
    # native 128 px tiles: the 2 and 3 px specks keep their size, the 1 px ones stay below 2 px
    assert evaluate(predictor, one, EvalConfig(tiled=True)).summary["n_resolvable"] == 5
