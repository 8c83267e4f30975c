"""`samforge train`, `samforge eval`, `samforge adapters inspect` on the tiny model."""

from __future__ import annotations

import json

import pytest

from services.cli import main


@pytest.fixture(scope="module")
def trained(blob_dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # the random tiny model does not beat its zero-shot output in 2 epochs: the guard is tested in test_cli_guard.py
    code = main(["train", "--data", str(blob_dataset_dir), "--method", "lora", "--model", "tiny", "--epochs", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--rank", "2", "--out", str(out), "--name", "blobs",
                 "--allow-regression"])
    assert code == 0
    return out


def test_train_publishes_adapter_and_report(trained, capsys):
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config["rank"] == 2 and config["name"] == "blobs"
    assert config["heldout_split"]["signature"] == config["metrics"]["heldout_signature"]
    report = json.loads((trained / "eval" / "report.json").read_text())
    assert [r["label"] for r in report["reports"]] == ["zero-shot", "fine-tuned (lora)"]
    assert (trained / "eval" / "training_curves.png").stat().st_size > 1000
    assert (trained / "eval" / "dice_histogram.png").stat().st_size > 1000
    diagnostics = json.loads((trained / "diagnostics.json").read_text())
    assert diagnostics["model"] == "tiny" and diagnostics["n_images"] == 6 and diagnostics["recommendations"] == []
    val = report["reports"][0]["summary"]
    assert val["n_resolvable"] == val["n_instances"] and val["dice_resolvable_mean"] == val["dice_mean"]


def test_eval_and_inspect(trained, blob_dataset_dir, tmp_path, capsys):
    assert main(["eval", "--data", str(blob_dataset_dir), "--model", "tiny", "--adapter", str(trained / "adapter"),
                 "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["dice_mean"]) == {"zero-shot", next(k for k in summary["dice_mean"] if k.startswith("blobs-"))}
    assert summary["dice_resolvable_mean"] == summary["dice_mean"] and summary["n_resolvable"] == summary["n_instances"]
    assert main(["adapters", "inspect", str(trained / "adapter"), "--model", "tiny"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["tensors"]["checksum"] == "ok" and inspected["loads_on"] == "tiny"


def test_inspect_reports_a_corrupt_adapter(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained / "adapter", copy)
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert main(["adapters", "inspect", str(copy)]) == 2
    assert "checksum" in capsys.readouterr().err


def test_train_rejects_a_bad_data_path(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "none"), "--model", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "none" in capsys.readouterr().err


def test_progress_bar_prints_the_data_check_line():
    import io

    from sam_core.training.config import Phase, ProgressEvent
    from services.cli_finetune import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(ProgressEvent(Phase.CHECKING_DATA, 0, 0, 0, message="data: 6 images, 8 instances"))
    bar(ProgressEvent(Phase.TRAINING, 1, 4, 0, loss=0.5))
    assert stream.getvalue().splitlines()[0] == "data: 6 images, 8 instances"
