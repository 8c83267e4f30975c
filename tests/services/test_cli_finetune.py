"""`samforge train`, `samforge eval`, `samforge adapters inspect` on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_eval_splits_are_the_ones_training_used(trained, blob_dataset_dir, tmp_path, capsys):
    """--split heldout scores the adapter's signed split as the guard did; --split val never includes it."""
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    heldout_ids = {image["image_id"] for image in config["heldout_split"]["images"]}

    def evaluated(split: str) -> tuple[set[str], dict]:
        out = tmp_path / split
        assert main(["eval", "--data", str(blob_dataset_dir), "--model", "tiny", "--adapter", str(trained / "adapter"),
                     "--split", split, "--out", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out)
        report = json.loads((out / "report.json").read_text())
        return set(report["reports"][0]["per_image"]), summary

    heldout, summary = evaluated("heldout")
    assert heldout == heldout_ids
    adapter_label = next(label for label in summary["dice_resolvable_mean"] if label != "zero-shot")
    assert summary["dice_resolvable_mean"][adapter_label] == pytest.approx(config["metrics"]["heldout_dice"], abs=1e-9)
    val, _ = evaluated("val")
    assert val and not val & heldout_ids


def test_eval_heldout_needs_an_adapter_with_a_split(blob_dataset_dir, tmp_path):
    with pytest.raises(SystemExit, match="--split heldout needs an --adapter"):
        main(["eval", "--data", str(blob_dataset_dir), "--model", "tiny", "--split", "heldout",
              "--out", str(tmp_path / "e")])


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
    result = json.loads((tmp_path / "o" / "result.json").read_text())  # what the trainer reads from its worker
    assert (result["status"], result["exit_code"]) == ("invalid_input", 2) and "none" in result["error"]


def test_train_events_and_result_file(blob_dataset_dir, tmp_path):
    events = tmp_path / "events.jsonl"
    assert main(["train", "--data", str(blob_dataset_dir), "--method", "decoder", "--model", "tiny", "--max-steps", "2",
                 "--batch-size", "2", "--out", str(tmp_path / "run"), "--events", str(events),
                 "--allow-regression"]) == 0  # the random tiny model: publish what it scores
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[0]["state"] == "checking_data" and lines[0]["message"].startswith("data: ")
    assert [e["step"] for e in lines if e["state"] == "training"][-1] == 2 and lines[-1]["state"] == "evaluating"
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (result["status"], result["exit_code"], result["method"]) == ("published", 0, "decoder")
    assert result["adapter_dir"] == str(tmp_path / "run" / "adapter") and set(result["val"]) == {
        "zero-shot", "fine-tuned (decoder)"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["decoder", "persam"])
def test_torchrun_two_ranks_exit_0_with_one_published_adapter(blob_dataset_dir, tmp_path, method):
    """``torchrun --nproc_per_node 2 samforge train``: rank 0 reports, evaluates and publishes; rank 1 only
    trains (a one-shot method: nothing); both exit 0."""
    samforge = shutil.which("samforge", path=str(Path(sys.executable).parent))
    assert samforge, "the samforge console script is installed next to the interpreter"
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           samforge, "train", "--data", str(blob_dataset_dir), "--out", str(out), "--model", "tiny",
                           "--method", method, "--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "1",
                           "--persam-steps", "3", "--events", str(out / "events.jsonl"), "--allow-regression"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stderr
    assert len(list(tmp_path.rglob("adapter_config.json"))) == 1 and (out / "adapter").is_dir()
    assert proc.stdout.count('"adapter_dir"') == 1  # one rank printed a summary
    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["state"] for e in lines].count("checking_data") == 1
    assert json.loads((out / "result.json").read_text())["status"] == "published"


def test_progress_bar_prints_the_data_check_line():
    import io

    from sam_core.training.config import Phase, ProgressEvent
    from services.cli_finetune import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(ProgressEvent(Phase.CHECKING_DATA, 0, 0, 0, message="data: 6 images, 8 instances"))
    bar(ProgressEvent(Phase.TRAINING, 1, 4, 0, loss=0.5))
    assert stream.getvalue().splitlines()[0] == "data: 6 images, 8 instances"


@pytest.mark.slow
def test_train_and_eval_a_sam2_model_from_its_checkpoint(blob_dataset_dir, tmp_path, capsys):
    """`samforge train|eval --model <sam2 id> --checkpoint X`: the adapter is tied to the checkpoint's model id,
    and eval scores base and adapter on the same checkpoint."""
    import torch

    from sam_core.adapters.artifact import read_adapter_config
    from sam_core.modeling.registry import load_model

    path = tmp_path / "tiny_sam2.pt"
    torch.save({"model": load_model("tiny_sam2").net.state_dict()}, path)
    model_id = load_model("tiny_sam2", path).model_id
    out = tmp_path / "run"
    assert main(["train", "--data", str(blob_dataset_dir), "--method", "decoder", "--model", "tiny_sam2",
                 "--checkpoint", str(path), "--epochs", "1", "--batch-size", "2", "--out", str(out),
                 "--name", "blobs", "--allow-regression"]) == 0
    config = read_adapter_config(out / "adapter")
    assert config.base_model_id == model_id and config.base_family == "sam2"
    capsys.readouterr()
    assert main(["eval", "--data", str(blob_dataset_dir), "--model", "tiny_sam2", "--checkpoint", str(path),
                 "--adapter", str(out / "adapter"), "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "zero-shot" in summary["dice_mean"] and len(summary["dice_mean"]) == 2
