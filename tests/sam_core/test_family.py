"""The model-family seam (sam_core.modeling.family) as SAM 1 implements it, and the method plug-ins on top."""

import copy

import pytest
import torch

from sam_core.errors import InvalidInput
from sam_core.modeling.family import ParamGroup, PromptBatch, SegmentationModel
from sam_core.training.methods import MethodConfig, get_method, method_names, trainable_names


def _boxes(n: int, size: int) -> PromptBatch:
    lo = torch.linspace(2, size / 4, n)
    return PromptBatch(boxes=torch.stack([lo, lo, lo + size / 2, lo + size / 3], dim=1))


def test_encode_returns_the_named_features_the_family_declares(tiny_model):
    net = tiny_model.net
    assert isinstance(net, SegmentationModel)
    with torch.no_grad():
        features = net.encode(torch.randn(2, 3, tiny_model.spec.img_size, tiny_model.spec.img_size))
    assert tuple(features) == net.feature_names
    for name, (c, h, w) in net.feature_shapes().items():
        assert features[name].shape == (2, c, h, w)


@pytest.mark.parametrize("fast", [True, False])
def test_mask_decoding_shapes_and_per_item_equivalence(tiny_model, fast):
    net, spec = tiny_model.net, tiny_model.spec
    with torch.no_grad():
        features = net.encode(torch.randn(1, 3, spec.img_size, spec.img_size))
    prompts = _boxes(3, spec.img_size)
    low, iou = net.mask_decoding(fast)(features, prompts, multimask=True)
    assert low.shape == (3, net.num_multimask_outputs, spec.low_res_size, spec.low_res_size)
    assert iou.shape == (3, net.num_multimask_outputs)
    single, single_iou = net.mask_decoding(fast)(features, prompts, multimask=False)
    repeated = {name: f.expand(3, -1, -1, -1) for name, f in features.items()}
    with torch.no_grad():  # training's path: every prompt against its own image's features
        per_item, per_item_iou = net.decode_per_item(repeated, prompts)
    torch.testing.assert_close(per_item, single, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(per_item_iou, single_iou, atol=1e-5, rtol=1e-5)


def test_parameter_groups_and_attention_sites(tiny_model, litemedsam_model):
    for model, blocks in ((tiny_model, 2), (litemedsam_model, 10)):  # tiny: 2 ViT blocks; TinyViT: 2 + 6 + 2
        net = model.net
        assert len(net.attention_sites()) == blocks
        groups = {g: {id(p) for p in net.group_parameters(g)} for g in ParamGroup}
        assert all(groups.values())
        assert groups[ParamGroup.ENCODER_ATTENTION] < groups[ParamGroup.IMAGE_ENCODER]
        encoders = groups[ParamGroup.IMAGE_ENCODER] | groups[ParamGroup.PROMPT_ENCODER]
        assert not groups[ParamGroup.MASK_DECODER] & encoders
        for site in net.attention_sites():
            assert not set(site.q_channels.tolist()) & set(site.v_channels.tolist())


def test_sharing_encoder_shares_encoders_and_copies_the_decoder(tiny_model):
    net = tiny_model.net
    shared = net.sharing_encoder()
    assert shared.group_modules(ParamGroup.IMAGE_ENCODER)[0] is net.group_modules(ParamGroup.IMAGE_ENCODER)[0]
    assert shared.group_modules(ParamGroup.PROMPT_ENCODER)[0] is net.group_modules(ParamGroup.PROMPT_ENCODER)[0]
    assert shared.group_modules(ParamGroup.MASK_DECODER)[0] is not net.group_modules(ParamGroup.MASK_DECODER)[0]
    assert shared.state_dict().keys() == net.state_dict().keys()


@pytest.mark.parametrize("name", method_names())
def test_each_method_trains_exactly_its_groups_and_injected_modules(tiny_model, name):
    method = get_method(name)
    net = method.trainable_copy(tiny_model.net, MethodConfig(name, rank=2))
    trained = trainable_names(net)
    for group in ParamGroup:
        names = {n for module in net.group_modules(group) for n, p in module.named_parameters() if p.requires_grad}
        if group in method.trained_groups:
            assert names and all(p.requires_grad for m in net.group_modules(group) for p in m.parameters())
    injected = {id(p) for m in method.injected_modules(net) for p in m.parameters()}
    assert all(p.requires_grad for m in method.injected_modules(net) for p in m.parameters())
    declared = {id(p) for g in method.trained_groups for p in net.group_parameters(g)} | injected
    assert {id(p) for n, p in net.named_parameters() if n in trained} == declared
    assert not any(p.requires_grad for p in net.group_parameters(ParamGroup.PROMPT_ENCODER))
    if method.one_shot:
        assert not trained
    assert bool(injected) == (name in ("lora", "adapter"))
    # the base model is untouched, and a frozen-encoder method shares the base encoder
    assert not any(p.requires_grad for p in tiny_model.net.parameters())
    base_encoder = tiny_model.net.group_modules(ParamGroup.IMAGE_ENCODER)[0]
    assert (net.group_modules(ParamGroup.IMAGE_ENCODER)[0] is base_encoder) == (not method.changes_image_encoder)


def test_fresh_injections_leave_the_output_unchanged(tiny_model):
    spec = tiny_model.spec
    x = torch.randn(1, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        reference = tiny_model.net.encode(x)
        for name in ("lora", "adapter"):
            net = get_method(name).trainable_copy(copy.deepcopy(tiny_model.net), MethodConfig(name))
            for key, value in net.encode(x).items():
                torch.testing.assert_close(value, reference[key])


def test_unknown_method_names_the_known_ones():
    with pytest.raises(InvalidInput) as err:
        MethodConfig("dora")
    assert err.value.field == "method" and all(name in str(err.value) for name in method_names())


def test_lora_cannot_be_injected_twice(tiny_model):
    lora = get_method("lora")
    net = lora.trainable_copy(tiny_model.net, MethodConfig("lora"))
    with pytest.raises(InvalidInput, match="already adapted"):
        lora.inject(net, MethodConfig("lora"))
