"""Training loop on the tiny model: every method learns, saves, reloads identically; exact resume
after a real kill; 2-rank DDP (gloo, torchrun) equals 1 process on the same global batch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sam_core.adapters.artifact import load_adapter, read_adapter_config
from sam_core.data.dataset import load_dataset
from sam_core.data.splits import split_dataset
from sam_core.errors import InvalidInput
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.training.config import TrainConfig, get_lr
from sam_core.training.loop import train
from sam_core.training.methods import MethodConfig, trainable_state

WORKER = Path(__file__).with_name("train_worker.py")


@pytest.fixture(scope="module")
def splits(blob_dataset_dir):
    return split_dataset(load_dataset(blob_dataset_dir), val_fraction=0.34, seed=0)


def test_get_lr_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert get_lr(0, cfg, 100) == pytest.approx(0.25)
    assert get_lr(3, cfg, 100) == pytest.approx(1.0)
    assert get_lr(4, cfg, 100) == pytest.approx(1.0)
    assert get_lr(52, cfg, 100) == pytest.approx(0.55)
    assert get_lr(100, cfg, 100) == pytest.approx(0.1)
    lrs = [get_lr(s, cfg, 100) for s in range(4, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize("method", ["decoder", "lora", "adapter", "full"])
def test_method_learns_saves_and_reloads_identically(method, tiny_model, splits, tmp_path):
    train_ds, val_ds = splits
    before = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    cfg = TrainConfig(method=MethodConfig(method), epochs=10, batch_size=2, lr=2e-3, warmup_steps=2,
                      checkpoint_every=100)
    events = []
    result = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run", callback=events.append)
    losses = result.history["loss"]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses  # it learns
    assert result.zero_shot_val_dice is not None and len(result.history["val_dice"]) == 10
    assert events[-1].state == "done" and any(e.state == "validating" for e in events)
    # the base model is untouched
    assert all(torch.equal(before[k], v) for k, v in tiny_model.net.state_dict().items())
    # the artifact reloads into a model that predicts exactly like the trained one
    config = read_adapter_config(result.adapter_dir)
    assert config.method == method and config.base_model_id == tiny_model.model_id
    assert config.shares_base_embeddings == (method == "decoder")
    reloaded = load_adapter(tiny_model, result.adapter_dir)
    image = train_ds[0].load_image()
    prompts = [Prompt.from_box([10, 10, 60, 50]), Prompt.from_points([[30, 30]], [1])]
    a = Predictor(result.model).decode(Predictor(result.model).encode_one(image), prompts)
    b = Predictor(reloaded).decode(Predictor(reloaded).encode_one(image), prompts)
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
    np.testing.assert_array_equal(a.masks, b.masks)
    base = Predictor(tiny_model).decode(Predictor(tiny_model).encode_one(image), prompts)
    assert not np.allclose(base.low_res_logits, b.low_res_logits)  # and differently from the base model


def test_decoder_method_caches_embeddings_on_disk(tiny_model, splits, tmp_path):
    train_ds, val_ds = splits
    cfg = TrainConfig(epochs=1, batch_size=2, checkpoint_every=100)
    train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run")
    files = list((tmp_path / "run" / "embeddings").rglob("*.safetensors"))
    assert len(files) == len(train_ds) + len(val_ds)


def _run_worker(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(blob_dataset_dir, tmp_path):
    for method in ("decoder", "lora"):
        whole = _run_worker([blob_dataset_dir, tmp_path / f"{method}_whole", method, 9, 2])
        assert whole.returncode == 0, whole.stderr
        killed = _run_worker([blob_dataset_dir, tmp_path / f"{method}_killed", method, 9, 2, 5])
        assert killed.returncode == -9, killed.stderr  # SIGKILL at step 5; last checkpoint at step 4
        assert not (tmp_path / f"{method}_killed" / "adapter").exists()  # nothing half-published
        resumed = _run_worker([blob_dataset_dir, tmp_path / f"{method}_killed", method, 9, 2])
        assert resumed.returncode == 0, resumed.stderr
        a = load_file(str(tmp_path / f"{method}_whole" / "final.safetensors"))
        b = load_file(str(tmp_path / f"{method}_killed" / "final.safetensors"))
        assert a.keys() == b.keys() and len(a) > 10
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


@pytest.mark.slow
def test_ddp_two_gloo_ranks_equal_one_process(blob_dataset_dir, tiny_model, tmp_path):
    single = _run_worker([blob_dataset_dir, tmp_path / "single", "decoder", 6, 4])
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(WORKER), str(blob_dataset_dir), str(tmp_path / "ddp"), "decoder", "6", "4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(str(tmp_path / "single" / "final.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final.safetensors"))
    initial = tiny_model.net.state_dict()
    for name in a:
        if name.endswith("k_proj.bias"):
            # An attention key bias shifts every logit of a query equally: it cancels in the softmax, its
            # true gradient is 0, and Adam turns float noise in it into arbitrary +-lr steps. No effect on
            # any output, so DDP and one process may legitimately differ there.
            continue
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    assert sum(not torch.allclose(a[n], initial[n]) for n in a) > len(a) // 2  # the runs did train


def test_early_stopping(tiny_model, splits, tmp_path):
    train_ds, val_ds = splits
    cfg = TrainConfig(epochs=50, batch_size=2, lr=1e-9, warmup_steps=1, patience=2, eval_every=1,
                      checkpoint_every=100)
    result = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run")
    assert result.stopped_early and result.steps == 3  # 1 best + 2 without improvement
    assert read_adapter_config(result.adapter_dir).metrics["stopped_early"] is True


def test_resume_refuses_a_different_config(tiny_model, splits, tmp_path):
    train_ds, val_ds = splits
    train(tiny_model, train_ds, val_ds, TrainConfig(epochs=1, batch_size=2, checkpoint_every=1), tmp_path / "run")
    with pytest.raises(InvalidInput) as info:
        train(tiny_model, train_ds, val_ds, TrainConfig(epochs=1, batch_size=2, lr=5e-4), tmp_path / "run")
    assert info.value.field == "out"


def test_resume_accepts_a_new_time_budget_and_settings_a_checkpoint_predates(tiny_model, splits, tmp_path):
    """A checkpoint written before a setting existed counts as that setting's default; the budget may differ."""
    from sam_core.training.checkpoint import latest_checkpoint, load_checkpoint
    from sam_core.training.config import StopTraining

    train_ds, val_ds = splits
    cfg = TrainConfig(max_steps=4, batch_size=2, checkpoint_every=1, eval_every=2)

    def stop_at_2(event) -> None:
        if event.state == "training" and event.step == 2 and event.loss is not None:
            raise StopTraining

    with pytest.raises(StopTraining):
        train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run", callback=stop_at_2)
    path = latest_checkpoint(tmp_path / "run")
    saved = load_checkpoint(path)
    for newer in ("val_max_instances", "crop_all_windows"):
        del saved["config"][newer]
    torch.save(saved, path)
    resumed = train(tiny_model, train_ds, val_ds, TrainConfig(**{**cfg.__dict__, "max_seconds": 600.0}),
                    tmp_path / "run")
    assert resumed.steps == 4 and not resumed.out_of_time


def test_persam_is_not_trained_by_the_loop(tiny_model, splits, tmp_path):
    with pytest.raises(InvalidInput) as info:
        train(tiny_model, *splits, TrainConfig(method=MethodConfig("persam")), tmp_path)
    assert info.value.field == "method"


def test_bad_config_is_rejected():
    with pytest.raises(InvalidInput):
        TrainConfig(batch_size=0)
    with pytest.raises(InvalidInput):
        MethodConfig("dreambooth")
    assert math.isfinite(get_lr(0, TrainConfig(), 1))
    assert trainable_state(torch.nn.Linear(2, 2)).keys() == {"weight", "bias"}


def test_published_adapter_is_the_best_validation_state(tiny_model, splits, tmp_path):
    """The artifact holds the weights of the best validation, not those of the last step."""
    from sam_core.evaluation.evaluate import EvalConfig, evaluate

    train_ds, val_ds = splits
    cfg = TrainConfig(epochs=6, batch_size=2, lr=3e-3, warmup_steps=1, eval_every=1, checkpoint_every=100)
    result = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run")
    scores = result.history["val_dice"]
    assert result.best_val_dice == max(scores)
    again = evaluate(Predictor(load_adapter(tiny_model, result.adapter_dir)), val_ds,
                     EvalConfig(prompt=cfg.eval_prompt, seed=cfg.seed))
    assert again.summary["dice_mean"] == pytest.approx(result.best_val_dice, abs=1e-9)


def test_crop_window_snaps_to_the_half_crop_grid_and_clips():
    from sam_core.training.data import crop_window

    mask = np.zeros((300, 400), bool)
    mask[10:20, 390:398] = True                       # near the right border: the last start, flush
    assert crop_window(mask, 128) == (0, 272, 128, 400)
    mask[:] = False
    mask[140:160, 190:210] = True                     # rows 64/128 and columns 128/192 contain it: the most central
    assert crop_window(mask, 128) == (64, 128, 192, 256)
    neighbour = np.zeros_like(mask)
    neighbour[150:170, 170:185] = True                # a neighbour shares the window (and its embedding)
    assert crop_window(neighbour, 128) == (64, 128, 192, 256)
    mask[:] = False
    mask[100:200, 100:180] = True                     # no grid rows hold 100..199: centred; columns 64.. hold it
    assert crop_window(mask, 128) == (86, 64, 214, 192)
    mask[:] = False
    mask[140:160, 190:210] = True
    assert crop_window(mask, None) == (0, 0, 300, 400)
    mask[:] = False
    mask[0:200, 0:10] = True                          # taller than the crop -> whole image
    assert crop_window(mask, 128) == (0, 0, 300, 400)


def test_grid_windows_lists_every_grid_window_that_contains_the_instance():
    from sam_core.training.data import crop_window, grid_windows

    mask = np.zeros((300, 400), bool)
    mask[140:160, 190:210] = True                     # rows 64 and 128 and column 128 contain it
    windows = grid_windows(mask, 128)
    assert windows[0] == crop_window(mask, 128)       # the most central first
    assert sorted(windows) == [(64, 128, 192, 256), (128, 128, 256, 256)]
    mask[:] = False
    mask[100:200, 100:180] = True                     # no grid rows hold it: its centred window only
    assert grid_windows(mask, 128) == (crop_window(mask, 128),)
    mask[:] = False
    mask[0:200, 0:10] = True                          # taller than the crop: the whole image
    assert grid_windows(mask, 128) == ((0, 0, 300, 400),)


def test_crop_training_through_all_grid_windows(tiny_model, splits, tmp_path):
    """crop_all_windows embeds every grid window holding an instance, draws one per step (reproducibly), and
    validates on the central windows."""
    from sam_core.training.data import TrainingData

    train_ds, val_ds = splits
    cfg = TrainConfig(epochs=2, batch_size=2, lr=2e-3, warmup_steps=1, crop=64, checkpoint_every=100,
                      crop_all_windows=True)
    central = TrainingData(train_ds, Predictor(tiny_model), cache_embeddings=False, store=None, crop=64)
    every = TrainingData(train_ds, Predictor(tiny_model), cache_embeddings=False, store=None, crop=64,
                         all_windows=True)
    assert len(every.windows) > len(central.windows)
    drawn = {it.drawn(np.random.default_rng([0, k, 1])).window for k, it in enumerate(every.items * 8)}
    assert drawn - {it.window for it in central.items}  # steps see windows besides the central ones
    first = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "a")
    again = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "b")
    assert first.history["loss"] == again.history["loss"]
    embedded = list((tmp_path / "a" / "embeddings").rglob("*.safetensors"))
    val_windows = TrainingData(val_ds, Predictor(tiny_model), cache_embeddings=False, store=None, crop=64).windows
    assert len(embedded) == len({(i, w) for i, w in every.windows}) + len(val_windows)


def test_native_resolution_crop_training(tiny_model, splits, tmp_path):
    train_ds, val_ds = splits  # 96 x 128 images; 64 px crops keep objects at native resolution
    cfg = TrainConfig(epochs=4, batch_size=2, lr=2e-3, warmup_steps=1, crop=64, checkpoint_every=100)
    result = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run")
    assert np.mean(result.history["loss"][-2:]) < np.mean(result.history["loss"][:2])
    embedded = list((tmp_path / "run" / "embeddings").rglob("*.safetensors"))
    assert len(embedded) == train_ds.n_instances + val_ds.n_instances  # one crop per instance


def test_time_budget_stops_and_still_publishes(tiny_model, splits, tmp_path):
    train_ds, val_ds = splits
    cfg = TrainConfig(epochs=1000, batch_size=2, max_seconds=0.5, checkpoint_every=1000)
    result = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run")
    assert result.stopped_early and result.steps < 1000 * 2
    assert result.history["val_step"][-1] == result.steps and (result.adapter_dir / "adapter_config.json").exists()


def test_stop_training_checkpoints_the_current_step(tiny_model, splits, tmp_path):
    """A callback that stops the run (cancel, shutdown) leaves a checkpoint at that very step."""
    from sam_core.training.checkpoint import latest_checkpoint, load_checkpoint
    from sam_core.training.config import StopTraining

    train_ds, val_ds = splits
    cfg = TrainConfig(epochs=20, batch_size=2, checkpoint_every=1000)

    def stop_at_5(event):
        if event.state == "training" and event.step == 5:
            raise StopTraining()

    with pytest.raises(StopTraining):
        train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run", callback=stop_at_5)
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 5
    resumed = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run")
    assert resumed.steps == cfg.epochs * (train_ds.n_instances // 2)


@pytest.fixture(scope="module")
def speck_ds(tmp_path_factory):
    from tests.sam_core.test_diagnostics import write_speck_dataset

    return load_dataset(write_speck_dataset(tmp_path_factory.mktemp("specks")))


@pytest.mark.parametrize(("crop", "n_resolvable"), [(None, 3), (128, 15)])
def test_validation_scores_all_and_resolvable_instances(tiny_model, speck_ds, crop, n_resolvable):
    """Whole 512 px images at the 128 px input leave only the 60 px squares resolvable; native 128 px crops
    also resolve the 2 and 3 px specks."""
    from sam_core.training.data import TrainingData
    from sam_core.training.validation import validation_score

    predictor = Predictor(tiny_model)
    data = TrainingData(speck_ds, predictor, cache_embeddings=False, store=None, crop=crop)
    score = validation_score(predictor, data, TrainConfig().eval_prompt, 0, reuse_embeddings=False)
    assert (score.n, score.n_resolvable) == (21, n_resolvable)
    assert score.selection == score.dice_resolvable != score.dice_all


@pytest.mark.parametrize("crop", [None, 128])
def test_validation_caps_instances_per_image(tiny_model, speck_ds, crop):
    """val_max_instances keeps the first instances of each image, in the whole-image and the crop path."""
    from sam_core.training.data import TrainingData
    from sam_core.training.validation import validation_score

    predictor = Predictor(tiny_model)
    data = TrainingData(speck_ds, predictor, cache_embeddings=False, store=None, crop=crop, max_instances=2)
    expected = sum(min(2, len(sample.instances)) for sample in speck_ds)
    assert expected < speck_ds.n_instances
    assert len(data.items) == expected
    assert {it.instance_index for it in data.items} == {0, 1}
    score = validation_score(predictor, data, TrainConfig().eval_prompt, 0, reuse_embeddings=False)
    assert score.n == expected
    with pytest.raises(InvalidInput, match="val_max_instances"):
        TrainConfig(val_max_instances=0)


def test_crop_validation_encodes_each_window_once(tiny_model, speck_ds, monkeypatch):
    """Instances sharing a grid window share its encoding, and the score is the one the cached path gives."""
    from sam_core.training.data import TrainingData
    from sam_core.training.validation import validation_score

    predictor = Predictor(tiny_model)
    data = TrainingData(speck_ds, predictor, cache_embeddings=False, store=None, crop=128)
    assert len(data.windows) < len(data.items)
    cached = validation_score(predictor, data, TrainConfig().eval_prompt, 0, reuse_embeddings=True)
    calls = []
    encode = predictor.encode_one
    monkeypatch.setattr(predictor, "encode_one", lambda image: calls.append(image.shape) or encode(image))
    fresh = validation_score(predictor, data, TrainConfig().eval_prompt, 0, reuse_embeddings=False)
    assert len(calls) == len(data.windows)
    assert fresh == cached


def test_model_selection_uses_the_resolvable_dice(tiny_model, speck_ds, tmp_path):
    from sam_core.evaluation.evaluate import EvalConfig, evaluate

    cfg = TrainConfig(epochs=2, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=2, checkpoint_every=100)
    result = train(tiny_model, speck_ds, speck_ds, cfg, tmp_path / "run")
    history = result.history
    assert len(history["val_dice_all"]) == len(history["val_dice"]) >= 2
    assert result.best_val_dice == max(history["val_dice"])
    again = evaluate(Predictor(load_adapter(tiny_model, result.adapter_dir)), speck_ds,
                     EvalConfig(prompt=cfg.eval_prompt, seed=cfg.seed))
    assert again.summary["dice_resolvable_mean"] == pytest.approx(result.best_val_dice, abs=1e-9)
    assert again.summary["dice_mean"] != pytest.approx(result.best_val_dice, abs=1e-6)


@pytest.mark.parametrize("crop", [None, 32])
def test_cache_encoder_outputs_leaves_nothing_for_train_to_encode(tiny_model, splits, tmp_path, monkeypatch, crop):
    """After cache_encoder_outputs, a decoder run into the same folder never runs the image encoder."""
    from sam_core.training.loop import cache_encoder_outputs

    train_ds, val_ds = splits
    cfg = TrainConfig(epochs=1, batch_size=2, crop=crop)
    cache_encoder_outputs(tiny_model, train_ds, val_ds, cfg, tmp_path / "run")
    assert list((tmp_path / "run" / "embeddings").iterdir())

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran after the caches were filled")

    monkeypatch.setattr(Predictor, "encode_one", no_encoder)
    monkeypatch.setattr(Predictor, "encode_tensor", no_encoder)
    result = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "run")
    assert result.steps == train_ds.n_instances // 2
