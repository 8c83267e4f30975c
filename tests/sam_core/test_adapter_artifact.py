"""Adapter artifacts: atomic save, strict load with one clear error, base untouched, shared encoder."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sam_core.adapters.artifact import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapted_net,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from sam_core.errors import AdapterInvalid, InvalidInput, NotFound
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.modeling.registry import build_tiny
from sam_core.training.methods import MethodConfig, trainable_state


def _perturbed(model, method: str):
    """A prepared Sam for ``method`` with its trainable tensors moved away from the base."""
    cfg = MethodConfig(method)
    sam = adapted_net(model, cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sam.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return cfg, sam


@pytest.fixture()
def saved(tiny_model, tmp_path):
    def make(method: str = "decoder", name: str = "ships"):
        cfg, sam = _perturbed(tiny_model, method)
        out = tmp_path / f"{method}_{name}"
        config = save_adapter(out, tiny_model, trainable_state(sam), cfg, metrics={"val_dice": 0.5}, name=name)
        return out, config, sam

    return make


@pytest.mark.parametrize("method", ["decoder", "lora", "adapter", "full"])
def test_round_trip_predicts_like_the_saved_model(method, tiny_model, saved, scene):
    out, config, sam = saved(method)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    text = (out / CONFIG_NAME).read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))  # sorted keys
    loaded = load_adapter(tiny_model, out)
    assert loaded.adapter.method == method and loaded.model_id == tiny_model.model_id
    image = scene[0]
    prompts = [Prompt.from_box([20, 20, 120, 100])]
    a = Predictor(loaded).decode(Predictor(loaded).encode_one(image), prompts)
    reference = loaded.__class__(net=sam.eval(), spec=tiny_model.spec, weights_sha256=tiny_model.weights_sha256,
                                 source="ref", adapter=config, adapter_id=loaded.adapter_id)
    b = Predictor(reference).decode(Predictor(reference).encode_one(image), prompts)
    np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-6)


def test_decoder_adapter_shares_the_base_encoder_and_embeddings(tiny_model, saved, scene):
    out, config, _ = saved("decoder")
    assert config.shares_base_embeddings
    loaded = load_adapter(tiny_model, out)
    assert loaded.net.image_encoder is tiny_model.net.image_encoder
    assert loaded.net.mask_decoder is not tiny_model.net.mask_decoder
    assert loaded.encoder_adapter_id is None
    base_embedding = Predictor(tiny_model).encode_one(scene[0])
    Predictor(loaded).decode(base_embedding, [Prompt.from_box([1, 1, 50, 50])])  # accepted


def test_encoder_adapter_has_its_own_embeddings(tiny_model, saved, scene):
    out, config, _ = saved("lora")
    assert not config.shares_base_embeddings
    loaded = load_adapter(tiny_model, out)
    assert loaded.encoder_adapter_id and loaded.encoder_adapter_id.startswith("ships-")
    base_embedding = Predictor(tiny_model).encode_one(scene[0])
    with pytest.raises(InvalidInput) as info:
        Predictor(loaded).decode(base_embedding, [Prompt.from_box([1, 1, 50, 50])])
    assert info.value.field == "embedding"
    own = Predictor(loaded).encode_one(scene[0])
    assert own.encoder_adapter == loaded.encoder_adapter_id
    assert not torch.allclose(own.image_embedding, base_embedding.image_embedding)


def test_base_model_is_never_modified(tiny_model, saved):
    before = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    for method in ("decoder", "lora", "adapter", "full"):
        load_adapter(tiny_model, saved(method, name=f"n{method}")[0])
    after = tiny_model.net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_base_model_is_refused(saved):
    out, _, _ = saved("decoder")
    with pytest.raises(AdapterInvalid, match="trained on tiny-"):
        load_adapter(build_tiny(seed=9), out)


def test_tampered_weights_fail_the_checksum(tiny_model, saved):
    out, _, _ = saved("lora")
    data = bytearray((out / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (out / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(AdapterInvalid, match="checksum"):
        load_adapter(tiny_model, out)


def _rewrite(out, tensors):
    """Replace the tensor file and update the recorded checksum (so only the tensor check can catch it)."""
    from sam_core.files import file_sha256

    save_file(tensors, str(out / WEIGHTS_NAME))
    config = json.loads((out / CONFIG_NAME).read_text())
    config["weights_sha256"] = file_sha256(out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(config))


def test_missing_extra_and_misshaped_tensors_in_one_error(tiny_model, saved):
    out, _, _ = saved("lora")
    tensors = load_file(str(out / WEIGHTS_NAME))
    names = sorted(tensors)
    dropped = names[0]
    tensors.pop(dropped)
    tensors["image_encoder.extra.weight"] = torch.zeros(2)
    shaped = names[1]
    tensors[shaped] = torch.zeros(3, 3)
    _rewrite(out, tensors)
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(tiny_model, out)
    message = str(info.value)
    assert "1 missing" in message and dropped in message
    assert "1 unexpected" in message and "image_encoder.extra.weight" in message
    assert "1 wrong shape" in message and shaped in message


def test_config_problems(tiny_model, saved, caplog):
    out, _, _ = saved("decoder")
    config = json.loads((out / CONFIG_NAME).read_text())
    config["future_field"] = 1
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        load_adapter(tiny_model, out)
    assert "future_field" in caplog.text
    del config["base_model_id"], config["method"]
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterInvalid, match="base_model_id, method|method, base_model_id"):
        read_adapter_config(out)
    (out / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterInvalid, match="not valid JSON"):
        read_adapter_config(out)
    with pytest.raises(NotFound):
        read_adapter_config(out.parent / "nothing")


def test_versions_are_immutable_and_no_partial_artifact(tiny_model, saved, monkeypatch):
    out, _, sam = saved("decoder")
    with pytest.raises(AdapterInvalid, match="immutable"):
        save_adapter(out, tiny_model, trainable_state(sam), MethodConfig("decoder"))
    import sam_core.adapters.artifact as artifact

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", boom)
    target = out.parent / "never"
    with pytest.raises(OSError):
        save_adapter(target, tiny_model, trainable_state(sam), MethodConfig("decoder"))
    assert not target.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temp folder removed


def test_lora_targets_q_and_v_only(tiny_model, litemedsam_model):
    for model in (tiny_model, litemedsam_model):
        cfg = MethodConfig("lora", rank=2)
        sam = adapted_net(model, cfg)
        names = [n for n, p in sam.named_parameters() if p.requires_grad and "lora_" in n]
        assert names and all(n.split(".")[-2] in {"lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v"} for n in names)
    # TinyViT interleaves q, k, v per head: q and v channel sets are disjoint and k is left out
    site = litemedsam_model.net.attention_sites()[0]
    q, v = site.q_channels, site.v_channels
    assert len(set(q.tolist()) & set(v.tolist())) == 0
    assert len(q) + len(v) < site.attn.qkv.out_features
