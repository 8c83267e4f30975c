"""Frozen-prefix activation cache: the family cut composes to the encoder exactly, training on cached prefix
activations follows the uncached loss trajectory (lora, adapter; tiny model and LiteMedSAM), entries are
signed and validated (another signature is an error or a wipe, never a reuse), resume reuses the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam_core.adapters.artifact import adapted_net
from sam_core.data.dataset import load_dataset
from sam_core.data.splits import split_dataset
from sam_core.errors import InvalidInput
from sam_core.training.config import StopTraining, TrainConfig
from sam_core.training.loop import train
from sam_core.training.methods import MethodConfig, get_method
from sam_core.training.prefix_cache import ActivationStore, PrefixCache
from tests.conftest import write_blob_dataset


@pytest.fixture(scope="module")
def splits(blob_dataset_dir):
    return split_dataset(load_dataset(blob_dataset_dir), val_fraction=0.34, seed=0)


def _entries(run_dir):
    return sorted((run_dir / "prefix_cache").rglob("*.safetensors"))


def _cfg(method: str, **kwargs) -> TrainConfig:
    base = {"method": MethodConfig(method), "epochs": 100, "max_steps": 6, "batch_size": 2, "lr": 2e-3,
            "warmup_steps": 2, "checkpoint_every": 100, "eval_every": 3, "seed": 1}
    return TrainConfig(**{**base, **kwargs})


@pytest.mark.parametrize("model_fixture", ["tiny_model", pytest.param("litemedsam_model", marks=pytest.mark.slow)])
def test_encoder_prefix_composes_to_the_whole_encoder(model_fixture, request, tmp_path):
    model = request.getfixturevalue(model_fixture)
    net = adapted_net(model, MethodConfig("lora"))
    first = get_method("lora").first_trained_module(net)
    cut = net.encoder_prefix(first)
    assert cut is not None and first.startswith(cut.cut + ".")
    assert cut.cut == ("image_encoder.blocks.0" if model_fixture == "tiny_model" else "image_encoder.layers.1")
    adapter_net = adapted_net(model, MethodConfig("adapter"))
    adapter_cut = adapter_net.encoder_prefix(get_method("adapter").first_trained_module(adapter_net))
    assert adapter_cut is not None and adapter_cut.cut == cut.cut
    x = torch.randn(2, 3, model.spec.img_size, model.spec.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = net.encode(x)
        parts = cut.suffix(cut.prefix(x))
    assert parts.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], atol=0, rtol=0)
    # windows cached one by one, batched again: the batched prefix's layout, so the suffix computes the same bits
    cache = PrefixCache(cut, ActivationStore(tmp_path / "s", signature={"m": "x"}), torch.device("cpu"), False)
    entries = [cache.activations(f"{i:08x}", lambda i=i: x[i]) for i in range(2)]
    with torch.no_grad():
        batch = cache.assemble(entries, torch.device("cpu"))
        assert batch.stride() == cut.prefix(x).stride()
        again = cut.suffix(batch)
    for name in whole:
        torch.testing.assert_close(again[name], whole[name], atol=0, rtol=0)


def test_methods_declare_what_they_train_first(tiny_model):
    for method, expected in (("decoder", None), ("full", "image_encoder"), ("adapter", "image_encoder.blocks.0")):
        net = adapted_net(tiny_model, MethodConfig(method))
        first = get_method(method).first_trained_module(net)
        assert first == expected or (first is not None and expected is not None and first.startswith(expected))
    full = adapted_net(tiny_model, MethodConfig("full"))
    assert full.encoder_prefix("image_encoder") is None  # everything trains: nothing to cache


@pytest.mark.parametrize("method,crop", [("lora", None), ("adapter", None), ("lora", 48)])
def test_loss_trajectory_with_the_cache_equals_the_uncached_one(method, crop, tiny_model, splits, tmp_path):
    train_ds, val_ds = splits
    cached = train(tiny_model, train_ds, val_ds, _cfg(method, crop=crop), tmp_path / "cached")
    plain = train(tiny_model, train_ds, val_ds, _cfg(method, crop=crop, prefix_cache=False), tmp_path / "plain")
    assert len(cached.history["loss"]) == 6
    np.testing.assert_allclose(cached.history["loss"], plain.history["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(cached.history["val_dice"], plain.history["val_dice"], rtol=0, atol=1e-6)
    windows = {(it.sample_index, it.window) for it in _training_items(train_ds, crop)}
    assert len(_entries(tmp_path / "cached")) == len(windows)  # one entry per training window
    assert not (tmp_path / "plain" / "prefix_cache").exists()


def _training_items(ds, crop):
    from sam_core.training.data import crop_window

    return [type("Item", (), {"sample_index": i, "window": crop_window(inst.mask, crop)})
            for i in range(len(ds)) for inst in ds[i].instances]


def test_a_cache_of_another_signature_is_never_reused(tiny_model, splits, tmp_path):
    train_ds, val_ds = splits
    run = tmp_path / "run"
    train(tiny_model, train_ds, val_ds, _cfg("lora", max_steps=2), run)
    before = {p: p.read_bytes() for p in _entries(run)}
    assert before
    # bf16 changes what the prefix computes: the run wipes the store and recomputes in bfloat16
    train(tiny_model, train_ds, val_ds, _cfg("lora", max_steps=2, bf16=True), run, resume=False)
    after = _entries(run)
    assert {p.name for p in after} == {p.name for p in before}
    assert all(p.read_bytes() != before[p] for p in after)
    signature = json.loads((run / "prefix_cache" / "signature.json").read_text())["signature"]
    assert signature["precision"] == "bfloat16"


def test_store_signature_and_entries_are_validated(tmp_path):
    signature = {"model_id": "m", "cut": "image_encoder.layers.1"}
    store = ActivationStore(tmp_path / "a", signature=signature)
    acts = torch.randn(1, 16, 8)
    store.put("ab" * 16, acts)
    stored = store.get("ab" * 16)
    assert stored is not None and stored[1] == (0, 1, 2)
    torch.testing.assert_close(stored[0], acts, atol=0, rtol=0)
    with pytest.raises(InvalidInput) as err:  # opening with another signature is an error ...
        ActivationStore(tmp_path / "a", signature={**signature, "cut": "image_encoder.layers.2"})
    assert err.value.field == "prefix_cache" and "cut" in err.value.detail
    wiped = ActivationStore(tmp_path / "a", signature={**signature, "cut": "image_encoder.layers.2"},
                            reset_on_mismatch=True)  # ... or a wipe, never a reuse
    assert len(wiped) == 0 and wiped.get("ab" * 16) is None
    # an entry written under another signature, planted in a store, is refused on load
    other = ActivationStore(tmp_path / "b", signature={**signature, "model_id": "other"})
    other.put("cd" * 16, acts)
    planted = wiped.path_for("cd" * 16)
    planted.parent.mkdir(exist_ok=True)
    planted.write_bytes(other.path_for("cd" * 16).read_bytes())
    with pytest.raises(InvalidInput) as err:
        wiped.get("cd" * 16)
    assert err.value.field == "prefix_cache"
    # a corrupt entry is deleted and reported absent (then recomputed)
    wiped.put("ef" * 16, acts)
    path = wiped.path_for("ef" * 16)
    path.write_bytes(path.read_bytes()[:-7])
    assert wiped.get("ef" * 16) is None and not path.exists()


def test_a_prefix_with_trainable_parameters_is_refused(tiny_model, tmp_path):
    net = adapted_net(tiny_model, MethodConfig("full"))  # trains patch_embed too
    split = net.encoder_prefix("image_encoder.blocks.0")
    assert split is not None
    cache = PrefixCache(split, ActivationStore(tmp_path / "s", signature={"m": "x"}), torch.device("cpu"), False)
    with pytest.raises(InvalidInput) as err:
        cache.compute(torch.zeros(3, tiny_model.spec.img_size, tiny_model.spec.img_size))
    assert err.value.field == "method"


def test_resume_reuses_the_cache_and_equals_an_uninterrupted_run(tiny_model, splits, tmp_path):
    train_ds, val_ds = splits
    cfg = _cfg("lora", checkpoint_every=2)
    whole = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "whole")

    def stop_at_3(event) -> None:
        if event.state == "training" and event.step == 3 and event.loss is not None:
            raise StopTraining

    with pytest.raises(StopTraining):
        train(tiny_model, train_ds, val_ds, cfg, tmp_path / "stopped", callback=stop_at_3)
    stamps = {p: p.stat().st_mtime_ns for p in _entries(tmp_path / "stopped")}
    resumed = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "stopped")
    assert {p: p.stat().st_mtime_ns for p in _entries(tmp_path / "stopped")} == stamps  # read, not rewritten
    np.testing.assert_allclose(resumed.history["loss"], whole.history["loss"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_litemedsam_loss_trajectory_with_the_cache(litemedsam_model, tmp_path):
    """lora on the real TinyViT (adapter cuts at the same block: the composition test checks; tiny runs both)."""
    ds = load_dataset(write_blob_dataset(tmp_path / "data", n_images=2))
    cfg = _cfg("lora", max_steps=2, eval_every=0, warmup_steps=1, lr=1e-3)
    cached = train(litemedsam_model, ds, None, cfg, tmp_path / "cached")
    plain = train(litemedsam_model, ds, None, TrainConfig(**{**cfg.__dict__, "prefix_cache": False}),
                  tmp_path / "plain")
    np.testing.assert_allclose(cached.history["loss"], plain.history["loss"], rtol=0, atol=1e-6)


def test_a_run_resumes_across_the_cache_switch(tiny_model, splits, tmp_path):
    """The cache changes how a step computes, not what: an uncached run's checkpoint resumes cached."""
    train_ds, val_ds = splits

    def stop_at_2(event) -> None:
        if event.state == "training" and event.step == 2 and event.loss is not None:
            raise StopTraining

    cfg = _cfg("lora", max_steps=4, checkpoint_every=2, eval_every=0)
    with pytest.raises(StopTraining):
        train(tiny_model, train_ds, val_ds, TrainConfig(**{**cfg.__dict__, "prefix_cache": False}), tmp_path / "r",
              callback=stop_at_2)
    resumed = train(tiny_model, train_ds, val_ds, cfg, tmp_path / "r")
    assert resumed.steps == 4 and len(_entries(tmp_path / "r")) > 0
