"""Tests of the sam_core.data package (data set model, folder / COCO / npz readers, splits, fingerprint)
on small synthetic data sets written to tmp_path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam_core.data.dataset import load_dataset
from sam_core.data.fingerprint import dataset_fingerprint
from sam_core.data.samples import Instance, Sample
from sam_core.data.splits import split_by_lists, split_dataset, split_first_last
from sam_core.errors import InvalidInput, NotFound

H, W = 24, 32
# pycocotools' decode (used to build expected masks) trips a numpy 2 DeprecationWarning.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _rgb(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _binary(h: int = H, w: int = W) -> np.ndarray:
    """Two 5x5 blobs, one 2-pixel blob and two diagonal-touching pixels (one 8-connected component)."""
    m = np.zeros((h, w), np.uint8)
    m[2:7, 2:7] = 255
    m[10:15, 20:25] = 255
    m[20, 2:4] = 255
    m[18, 28] = 255
    m[19, 29] = 255
    return m


def _seed(stem: str) -> int:
    return sum(map(ord, stem))


def _folder(root: Path, stems: list[str]) -> Path:
    for stem in stems:
        _save(root / "images" / f"{stem}.png", _rgb(seed=_seed(stem)))
        _save(root / "masks" / f"{stem}.png", _binary())
    return root


# ---------------------------------------------------------------------------------------------- folder


def test_folder_binary_connected_components(tmp_path: Path) -> None:
    _folder(tmp_path, ["a"])
    ds = load_dataset(tmp_path)
    assert ds.format == "folder" and len(ds) == 1
    sample = ds[0]
    assert isinstance(sample, Sample) and sample.image_id == "a"
    assert (sample.height, sample.width) == (H, W)
    assert len(sample.instances) == 4  # diagonal pixels join under 8-connectivity
    union = np.zeros((H, W), bool)
    for inst in sample.instances:
        assert isinstance(inst, Instance) and inst.mask.dtype == bool and inst.mask.shape == (H, W)
        assert not (union & inst.mask).any()
        union |= inst.mask
    assert np.array_equal(union, _binary() > 0)
    assert ds.report.n_samples == 1 and ds.report.n_instances == 4


def test_folder_min_area_drops_small_components(tmp_path: Path) -> None:
    _folder(tmp_path, ["a"])
    ds = load_dataset(tmp_path, min_area=3)
    areas = sorted(int(i.mask.sum()) for i in ds[0].instances)
    assert areas == [25, 25]


def test_image_is_lazy_and_decoded_once(tmp_path: Path) -> None:
    _folder(tmp_path, ["a"])
    sample = load_dataset(tmp_path)[0]
    assert sample.image is None
    image = sample.load_image()
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert np.array_equal(image, _rgb(seed=_seed("a")))
    assert sample.load_image() is image


def test_masks_instances_take_precedence(tmp_path: Path) -> None:
    _folder(tmp_path, ["a", "b"])
    ids = np.zeros((H, W), np.uint16)
    ids[0:10, 0:10] = 3
    ids[0:10, 10:20] = 700  # touching the first: only ids can separate them
    _save(tmp_path / "masks_instances" / "a.png", ids)
    ds = load_dataset(tmp_path)
    a, b = ds.get("a"), ds.get("b")
    assert [i.instance_id for i in a.instances] == [3, 700]
    assert np.array_equal(a.instances[1].mask, ids == 700)
    assert len(b.instances) == 4  # b has only a binary mask


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    image = Image.fromarray(_rgb(H, W))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: displayed size is W x H swapped
    (tmp_path / "images").mkdir()
    image.save(tmp_path / "images" / "a.jpg", exif=exif)
    mask = np.zeros((W, H), np.uint8)
    mask[2:8, 2:8] = 255
    _save(tmp_path / "masks" / "a.png", mask)
    ds = load_dataset(tmp_path)
    assert (ds[0].height, ds[0].width) == (W, H)
    assert ds[0].load_image().shape == (W, H, 3)


def test_dataset_and_samples_pickle(tmp_path: Path) -> None:
    _folder(tmp_path, ["a"])
    ds = pickle.loads(pickle.dumps(load_dataset(tmp_path)))
    assert ds[0].load_image().shape == (H, W, 3)


# ---------------------------------------------------------------------------------------------- COCO


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE: column-major run lengths, starting with a (possibly empty) run of zeros."""
    flat = mask.flatten(order="F")
    bounds = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], bounds, [flat.size]])).tolist()
    return ([0] if flat[0] else []) + [int(r) for r in runs]


def _coco(tmp_path: Path) -> tuple[Path, dict[int, np.ndarray]]:
    _save(tmp_path / "images" / "one.png", _rgb())
    _save(tmp_path / "images" / "two.png", _rgb(seed=1))
    rect = np.zeros((H, W), np.uint8, order="F")
    rect[3:9, 4:12] = 1
    rle = mask_utils.encode(rect)
    rle["counts"] = rle["counts"].decode()
    blob = np.zeros((H, W), np.uint8, order="F")
    blob[15:20, 20:30] = 1
    uncompressed = {"size": [H, W], "counts": _uncompressed_counts(blob)}
    polygon = [[2.0, 2.0, 10.0, 2.0, 10.0, 10.0, 2.0, 10.0]]
    data = {
        "images": [
            {"id": 1, "file_name": "one.png", "height": H, "width": W},
            {"id": 2, "file_name": "two.png", "height": H, "width": W},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "segmentation": polygon, "iscrowd": 0, "category_id": 1},
            {"id": 11, "image_id": 1, "segmentation": rle, "iscrowd": 0, "category_id": 1},
            {"id": 12, "image_id": 2, "segmentation": uncompressed, "iscrowd": 0, "category_id": 1},
            {"id": 13, "image_id": 2, "segmentation": rle, "iscrowd": 1, "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    poly_mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W))).astype(bool)
    return path, {10: poly_mask, 11: rect.astype(bool), 12: blob.astype(bool)}


def test_coco_polygons_and_rle(tmp_path: Path) -> None:
    path, expected = _coco(tmp_path)
    ds = load_dataset(path)
    assert ds.format == "coco" and ds.image_ids == ["one", "two"]
    one, two = ds.get("one"), ds.get("two")
    assert [i.instance_id for i in one.instances] == [10, 11]
    assert [i.instance_id for i in two.instances] == [12]  # crowd annotation 13 skipped
    for inst in one.instances + two.instances:
        assert np.array_equal(inst.mask, expected[inst.instance_id])
    assert 64 <= expected[10].sum() <= 81  # the 8 x 8 polygon square, rasterised
    assert one.load_image().shape == (H, W, 3)
    assert len(load_dataset(path, include_crowd=True).get("two").instances) == 2


def test_coco_explicit_image_root_and_problems(tmp_path: Path) -> None:
    path, _ = _coco(tmp_path)
    data = json.loads(path.read_text())
    data["images"].append({"id": 3, "file_name": "gone.png", "height": H, "width": W})
    data["images"].append({"id": 4, "file_name": "wrong.png", "height": H + 1, "width": W})
    data["annotations"].append({"id": 20, "image_id": 4, "segmentation": [[1, 1, 5, 1, 5, 5]], "iscrowd": 0})
    _save(tmp_path / "images" / "wrong.png", _rgb())
    moved = tmp_path / "elsewhere" / "ann.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(data))
    ds = load_dataset(moved, image_root=tmp_path / "images")
    assert ds.image_ids == ["one", "two"]
    kinds = {(p.file, p.kind) for p in ds.report.problems}
    assert kinds == {("gone.png", "missing_partner"), ("wrong.png", "size_mismatch")}


# ---------------------------------------------------------------------------------------------- npz


def test_npz_folder(tmp_path: Path) -> None:
    gts = np.zeros((H, W), np.uint8)
    gts[1:5, 1:5] = 1
    gts[10:20, 10:20] = 4
    np.savez_compressed(tmp_path / "case1.npz", imgs=_rgb(), gts=gts)
    np.savez(tmp_path / "case2.npz", image=np.zeros((H, W), np.uint8), label=(gts > 0).astype(np.uint16))
    ds = load_dataset(tmp_path)
    assert ds.format == "npz" and ds.image_ids == ["case1", "case2"]
    c1 = ds.get("case1")
    assert [i.instance_id for i in c1.instances] == [1, 4]
    assert np.array_equal(c1.instances[1].mask, gts == 4)
    assert c1.image_path is None and np.array_equal(c1.load_image(), _rgb())
    assert ds.get("case2").load_image().shape == (H, W, 3)


def test_npz_problems(tmp_path: Path) -> None:
    gts = np.zeros((H, W), np.uint8)
    gts[1:5, 1:5] = 1
    np.savez(tmp_path / "ok.npz", imgs=_rgb(), gts=gts)
    np.savez(tmp_path / "nolabel.npz", imgs=_rgb())
    np.savez(tmp_path / "small.npz", imgs=_rgb(), gts=gts[:-1])
    np.savez(tmp_path / "empty.npz", imgs=_rgb(), gts=np.zeros_like(gts))
    np.savez(tmp_path / "pickled.npz", imgs=np.array([{"a": 1}], dtype=object), gts=gts)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    ds = load_dataset(tmp_path)
    assert ds.image_ids == ["ok"]
    kinds = {p.file: p.kind for p in ds.report.problems}
    assert kinds == {
        "nolabel.npz": "missing_partner",
        "small.npz": "size_mismatch",
        "empty.npz": "empty_mask",
        "pickled.npz": "unreadable",
        "junk.npz": "unreadable",
    }


# ---------------------------------------------------------------------------------------------- validation


def test_every_problem_kind_is_reported_with_its_file(tmp_path: Path) -> None:
    _folder(tmp_path, ["ok"])
    _save(tmp_path / "images" / "nomask.png", _rgb())
    _save(tmp_path / "masks" / "noimage.png", _binary())
    _save(tmp_path / "images" / "small.png", _rgb())
    _save(tmp_path / "masks" / "small.png", _binary(H - 2, W))
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG garbage")
    _save(tmp_path / "masks" / "broken.png", _binary())
    _save(tmp_path / "images" / "badmask.png", _rgb())
    (tmp_path / "masks" / "badmask.png").write_bytes(b"nope")
    _save(tmp_path / "images" / "empty.png", _rgb())
    _save(tmp_path / "masks" / "empty.png", np.zeros((H, W), np.uint8))
    _save(tmp_path / "images" / "dup.png", _rgb())
    _save(tmp_path / "images" / "dup.jpg", _rgb())
    _save(tmp_path / "masks" / "dup.png", _binary())

    ds = load_dataset(tmp_path)
    assert ds.image_ids == ["ok"]
    report = ds.report
    got = sorted((p.file, p.kind) for p in report.problems)
    assert got == [
        ("images/broken.png", "unreadable"),
        ("images/dup.jpg", "duplicate_stem"),
        ("images/dup.png", "duplicate_stem"),
        ("images/nomask.png", "missing_partner"),
        ("masks/badmask.png", "unreadable"),
        ("masks/empty.png", "empty_mask"),
        ("masks/noimage.png", "missing_partner"),
        ("masks/small.png", "size_mismatch"),
    ]
    assert report.n_skipped_empty == 1 and report.n_samples == 1 and report.n_instances == 4
    assert report.counts_by_kind()["missing_partner"] == 2
    text = report.summary()
    assert "1 usable samples" in text and "masks/small.png" in text and "images/nomask.png" in text


def test_empty_mask_below_min_area_is_skipped_not_fatal(tmp_path: Path) -> None:
    _folder(tmp_path, ["a"])
    tiny = np.zeros((H, W), np.uint8)
    tiny[0, 0] = 255
    _save(tmp_path / "images" / "b.png", _rgb())
    _save(tmp_path / "masks" / "b.png", tiny)
    ds = load_dataset(tmp_path, min_area=2)
    assert ds.image_ids == ["a"]
    assert [(p.file, p.kind) for p in ds.report.problems] == [("masks/b.png", "empty_mask")]


def test_no_usable_sample_raises(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "a.png", _rgb())
    _save(tmp_path / "masks" / "a.png", np.zeros((H, W), np.uint8))
    with pytest.raises(InvalidInput) as err:
        load_dataset(tmp_path)
    assert err.value.field == str(tmp_path) and "masks/a.png" in str(err.value)


def test_unknown_layout_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "stuff.txt").write_text("x")
    with pytest.raises(InvalidInput) as err:
        load_dataset(tmp_path)
    assert err.value.field == str(tmp_path) and "images/" in str(err.value)
    with pytest.raises(NotFound):
        load_dataset(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(InvalidInput, match="masks"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_and_listing_order_independent(tmp_path: Path) -> None:
    stems = [f"s{k:02d}" for k in range(10)]
    ds1 = load_dataset(_folder(tmp_path / "one", stems))
    ds2 = load_dataset(_folder(tmp_path / "two", stems[::-1]))
    train1, val1 = split_dataset(ds1, val_fraction=0.3, seed=7)
    train2, val2 = split_dataset(ds1, val_fraction=0.3, seed=7)
    train3, val3 = split_dataset(ds2, val_fraction=0.3, seed=7)
    train4, val4 = split_dataset(ds1.subset(stems[::-1]), val_fraction=0.3, seed=7)
    assert len(val1) == 3 and len(train1) == 7
    assert set(val1.image_ids).isdisjoint(train1.image_ids)
    assert val1.image_ids == val2.image_ids == val3.image_ids == val4.image_ids
    assert train1.image_ids == train3.image_ids
    other = {tuple(split_dataset(ds1, val_fraction=0.3, seed=s)[1].image_ids) for s in range(5)}
    assert len(other) > 1


def test_split_by_lists_and_first_last(tmp_path: Path) -> None:
    ds = load_dataset(_folder(tmp_path, ["a", "b", "c", "d"]))
    train, val = split_by_lists(ds, ["a", "c"], ["d"])
    assert train.image_ids == ["a", "c"] and val.image_ids == ["d"]
    with pytest.raises(InvalidInput, match="'zzz'") as err:
        split_by_lists(ds, ["a"], ["zzz"])
    assert err.value.field == "val_ids[0]"
    with pytest.raises(InvalidInput):
        split_by_lists(ds, ["a"], ["a"])
    train, val = split_first_last(ds, 2, 1)
    assert train.image_ids == ["a", "b"] and val.image_ids == ["d"]
    with pytest.raises(InvalidInput):
        split_first_last(ds, 3, 2)
    with pytest.raises(InvalidInput):
        split_dataset(ds, val_fraction=1.0)


# ---------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_tracks_mask_bytes(tmp_path: Path) -> None:
    one = _folder(tmp_path / "one", ["a", "b"])
    two = _folder(tmp_path / "two", ["b", "a"])
    fp = dataset_fingerprint(load_dataset(one))
    assert len(fp) == 64 and fp == dataset_fingerprint(load_dataset(two))
    changed = _binary()
    changed[0, 0] = 255
    _save(two / "masks" / "b.png", changed)
    assert dataset_fingerprint(load_dataset(two)) != fp


def test_coco_file_names_cannot_escape_the_image_root(tmp_path):
    import json as _json

    import cv2 as _cv2
    import numpy as _np

    from sam_core.data.dataset import load_dataset as _load
    from sam_core.errors import InvalidInput as _Invalid

    secret = tmp_path / "secret.png"
    other = tmp_path / "other.png"
    for path in (secret, other):
        _cv2.imwrite(str(path), _np.zeros((8, 8), _np.uint8))
    root = tmp_path / "coco"
    root.mkdir()
    seg = [[1, 1, 6, 1, 6, 6, 1, 6]]
    data = {"images": [{"id": 1, "file_name": "../secret.png", "height": 8, "width": 8},
                       {"id": 2, "file_name": str(other), "height": 8, "width": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg, "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 1, "segmentation": seg, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "x"}]}
    (root / "ann.json").write_text(_json.dumps(data))
    with pytest.raises(_Invalid) as info:
        _load(root / "ann.json")
    assert str(info.value).count("no absolute path") == 2
