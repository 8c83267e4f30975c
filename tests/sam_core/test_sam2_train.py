"""The training loop on ``tiny_sam2``: every method learns through ``sam_core.training.loop.train`` (``decoder``
on the three-level embeddings cached in the EmbeddingStore), its artifact reloads into a model that predicts
exactly like the trained one and differently from the base; PerSAM fits and round-trips on a SAM 2 base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_core.adapters.artifact import load_adapter, read_adapter_config
from sam_core.data.dataset import load_dataset
from sam_core.data.splits import split_dataset
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.modeling.registry import load_model
from sam_core.training.config import TrainConfig
from sam_core.training.loop import train
from sam_core.training.methods import MethodConfig
from tests.conftest import synthetic_scene, write_blob_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny2():
    return load_model("tiny_sam2")


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = write_blob_dataset(tmp_path_factory.mktemp("blobs2"), height=128, width=128)
    return split_dataset(load_dataset(root), val_fraction=0.34, seed=0)


def _decode(model, image):
    predictor = Predictor(model)
    prompts = [Prompt.from_box([10, 10, 60, 50]), Prompt.from_points([[30, 30]], [1])]
    return predictor.decode(predictor.encode_one(image), prompts)


@pytest.mark.parametrize("method", ["decoder", "lora", "adapter", "full"])
def test_method_learns_saves_and_reloads_identically(method, tiny2, splits, tmp_path):
    train_ds, val_ds = splits
    before = {k: v.clone() for k, v in tiny2.net.state_dict().items()}
    cfg = TrainConfig(method=MethodConfig(method, rank=2), epochs=8, batch_size=2, lr=3e-3, warmup_steps=2,
                      checkpoint_every=100)
    result = train(tiny2, train_ds, val_ds, cfg, tmp_path / "run")
    losses = result.history["loss"]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.02, losses
    assert all(torch.equal(before[k], v) for k, v in tiny2.net.state_dict().items())
    if method == "decoder":  # trained on the cached three-level embeddings
        assert len(list((tmp_path / "run" / "embeddings").rglob("*.safetensors"))) == len(train_ds) + len(val_ds)
    config = read_adapter_config(result.adapter_dir)
    assert config.base_model_id == tiny2.model_id and config.base_family == "sam2"
    reloaded = load_adapter(tiny2, result.adapter_dir)
    image = train_ds[0].load_image()
    a, b = _decode(result.model, image), _decode(reloaded, image)
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.allclose(_decode(tiny2, image).low_res_logits, b.low_res_logits)


def test_persam_fits_and_round_trips_on_a_sam2_base(tiny2, tmp_path):
    from sam_core.training.persam import fit_persam, load_persam, save_persam, segment_persam

    image, masks = synthetic_scene(128, 128)
    predictor = Predictor(tiny2)
    losses: list[float] = []
    persam, _ = fit_persam(predictor, image, masks[0], steps=40, lr=1e-2,
                           callback=lambda step, loss: losses.append(loss))
    assert persam.target_feat.shape == (tiny2.net.feature_shapes()["image_embed"][0],)
    assert losses[-1] < losses[0], losses
    save_persam(tmp_path / "persam", tiny2, persam)
    reloaded = load_persam(tiny2, tmp_path / "persam")
    torch.testing.assert_close(reloaded.mask_weights, persam.mask_weights, rtol=0, atol=0)
    target, _ = synthetic_scene(128, 128, seed=1)
    a, _ = segment_persam(predictor, persam, target)
    b, _ = segment_persam(predictor, reloaded, target)
    np.testing.assert_array_equal(a, b)
