"""`samforge train`'s publish guard on the tiny model: a harmful run (lr 1.0) is rejected (exit 3, nothing in
adapter/), --allow-regression publishes it, a sound run beats it as champion on the same signed split, and a
held-out image missing from new data is a clear error (exit 2).

The tiny model is random: a sound 2-epoch run does not beat its zero-shot output, so the sound run here is
judged against the harmful champion (the champion/challenger mechanics are what is tested).
"""

from __future__ import annotations

import json

import pytest

from services.cli import main
from tests.conftest import write_blob_dataset

pytestmark = pytest.mark.slow


def train(data, out, *extra: str) -> int:
    return main(["train", "--data", str(data), "--method", "decoder", "--model", "tiny", "--epochs", "2",
                 "--batch-size", "2", "--out", str(out), "--name", "blobs", *extra])


def test_harmful_run_rejected_then_allowed_then_beaten_on_the_same_split(tmp_path, capsys):
    data = write_blob_dataset(tmp_path / "blobs", n_images=8)
    harmful = tmp_path / "harmful"
    assert train(data, harmful, "--lr", "1.0") == 3
    err = capsys.readouterr().err
    assert "rejected: candidate dice_resolvable_mean 0.0000 vs baseline (base model)" in err
    assert not (harmful / "adapter").exists()
    rejected = json.loads((harmful / "rejected" / "adapter_config.json").read_text())
    result = json.loads((harmful / "result.json").read_text())
    assert result["exit_code"] == 3 and result["status"] == "rejected" and result["accepted"] is False
    verdict = result["guard"]
    assert verdict["candidate"] < verdict["baseline"] and verdict["baseline_label"] == "base model"
    assert rejected["metrics"]["heldout_dice"] == verdict["candidate"]
    split = rejected["heldout_split"]
    assert rejected["metrics"]["heldout_signature"] == split["signature"] == verdict["signature"]

    assert train(data, harmful, "--lr", "1.0", "--allow-regression") == 0  # resumes, same scores, published
    champion = json.loads((harmful / "adapter" / "adapter_config.json").read_text())
    assert not (harmful / "rejected").exists() and champion["heldout_split"] == split
    assert json.loads((harmful / "result.json").read_text())["guard"]["candidate"] == verdict["candidate"]

    sound = tmp_path / "sound"
    capsys.readouterr()
    assert train(data, sound, "--lr", "1e-3", "--baseline", str(harmful / "adapter")) == 0
    assert "accepted: candidate" in capsys.readouterr().err
    challenger = json.loads((sound / "adapter" / "adapter_config.json").read_text())
    assert challenger["heldout_split"] == split  # the second run of the name reuses the signed split
    second = json.loads((sound / "result.json").read_text())["guard"]
    assert second["signature"] == split["signature"] and second["baseline"] == verdict["candidate"]
    assert second["candidate"] > second["baseline"] and second["baseline_label"].startswith("blobs-")
    held = {i["image_id"] for i in split["images"]}
    assert held and not (sound / "rejected").exists()

    lost = sorted(held)[0]  # a later version of the data set lost a held-out image
    for sub in ("images", "masks"):
        (data / sub / f"{lost}.png").unlink()
    capsys.readouterr()
    assert train(data, tmp_path / "third", "--baseline", str(sound / "adapter")) == 2
    err = capsys.readouterr().err
    assert "heldout_split" in err and f"{lost} (image missing)" in err
    assert not (tmp_path / "third" / "adapter").exists() and not (tmp_path / "third" / "rejected").exists()
