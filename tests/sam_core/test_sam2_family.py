"""The SAM 2 family on ``tiny_sam2``: the family seam, square preprocessing as SAM2Transforms, checkpoints and the
refusal of an adapter of the other family. Every fine-tuning method through the training loop:
tests/sam_core/test_sam2_train.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sam_core.adapters.artifact import load_adapter, read_adapter_config
from sam_core.errors import AdapterInvalid, ModelLoadError
from sam_core.modeling.family import ParamGroup, PromptBatch
from sam_core.modeling.preprocess import preprocess, transform_boxes, transform_coords, upscale_logits
from sam_core.modeling.registry import SAM2_CONFIGS, SPECS, build_tiny_sam2, load_model
from sam_core.modeling.sam2 import FEATURE_NAMES, VIDEO_ONLY_KEYS, Sam2Model
from tests.conftest import save_perturbed_adapter


@pytest.fixture(scope="module")
def tiny2():
    return load_model("tiny_sam2")


def _image(seed: int = 0, h: int = 90, w: int = 140) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _boxes(n: int, size: int) -> PromptBatch:
    lo = torch.linspace(2, size / 4, n)
    return PromptBatch(boxes=torch.stack([lo, lo, lo + size / 2, lo + size / 3], dim=1))


# ---------------------------------------------------------------------------------------------- seam
def test_encode_features_shapes_and_tuple_encoder(tiny2):
    net = tiny2.net
    assert isinstance(net, Sam2Model) and net.feature_names == FEATURE_NAMES
    batch = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        features = net.encode(batch)
        for optimize in (True, False):
            again = net.features_from_encoder(net.inference_encoder(optimize)(batch))
            for name in FEATURE_NAMES:
                torch.testing.assert_close(again[name], features[name], atol=1e-6, rtol=0)
    assert tuple(features) == FEATURE_NAMES
    for name, (c, h, w) in net.feature_shapes().items():
        assert features[name].shape == (2, c, h, w)
    with pytest.raises(ValueError, match="image_embed"):
        net.features_from_encoder(features["image_embed"])


def test_decoding_many_prompts_equals_one_by_one_and_per_item(tiny2):
    net, spec = tiny2.net, tiny2.spec
    with torch.no_grad():
        features = net.encode(torch.randn(1, 3, 128, 128))
    prompts = _boxes(4, spec.img_size)
    low, iou = net.mask_decoding()(features, prompts, multimask=True)
    assert low.shape == (4, 3, spec.low_res_size, spec.low_res_size) and iou.shape == (4, 3)
    for i in range(4):
        one, one_iou = net.mask_decoding()(features, PromptBatch(boxes=prompts.boxes[i:i + 1]), multimask=True)
        torch.testing.assert_close(one, low[i:i + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(one_iou, iou[i:i + 1], atol=1e-6, rtol=0)
    static = copy.deepcopy(net)  # the training-mode single-mask output: token 0, no stability fallback
    static.sam_mask_decoder.dynamic_multimask_via_stability = False
    single, single_iou = static.mask_decoding()(features, prompts, multimask=False)
    repeated = {name: f.expand(4, -1, -1, -1) for name, f in features.items()}
    with torch.no_grad():
        per_item, per_item_iou = net.decode_per_item(repeated, prompts)
    torch.testing.assert_close(per_item, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_item_iou, single_iou, atol=1e-6, rtol=0)


def test_groups_attention_sites_and_sharing(tiny2):
    net = tiny2.net
    sites = net.attention_sites()
    assert len(sites) == 5  # Hiera stages (1, 1, 2, 1)
    for site in sites:
        out = site.attn.qkv.out_features
        assert out == 3 * site.dim and len(site.q_channels) == len(site.v_channels) == site.dim
        assert site.v_channels[-1] == out - 1 and not set(site.q_channels.tolist()) & set(site.v_channels.tolist())
    assert sites[1].attn.dim != sites[1].dim  # a stage transition: dim -> dim_out
    groups = {g: {id(p) for p in net.group_parameters(g)} for g in ParamGroup}
    assert all(groups.values())
    assert groups[ParamGroup.ENCODER_ATTENTION] < groups[ParamGroup.IMAGE_ENCODER]
    assert {id(p) for p in net.sam_mask_decoder.conv_s0.parameters()} < groups[ParamGroup.IMAGE_ENCODER]
    assert not groups[ParamGroup.MASK_DECODER] & (groups[ParamGroup.IMAGE_ENCODER] | groups[ParamGroup.PROMPT_ENCODER])
    shared = net.sharing_encoder()
    assert shared.image_encoder is net.image_encoder and shared.sam_prompt_encoder is net.sam_prompt_encoder
    assert shared.sam_mask_decoder.conv_s1 is net.sam_mask_decoder.conv_s1
    assert shared.sam_mask_decoder.transformer is not net.sam_mask_decoder.transformer
    assert shared.state_dict().keys() == net.state_dict().keys()


# ---------------------------------------------------------------------------------------------- preprocessing
def test_square_preprocessing_is_sam2transforms():
    from sam2.utils.transforms import SAM2Transforms

    spec = SPECS["tiny_sam2"]
    reference = SAM2Transforms(resolution=spec.img_size, mask_threshold=0.0)
    image = _image()
    x, input_size = preprocess(image, spec)
    assert input_size == (128, 128)
    assert torch.equal(x, reference(image)[None])
    coords = np.array([[[10.0, 20.0], [139.0, 89.0]]])
    expected = reference.transform_coords(torch.tensor(coords), normalize=True, orig_hw=image.shape[:2])
    np.testing.assert_allclose(transform_coords(coords, image.shape[:2], spec), expected.numpy(), atol=1e-4)
    box = np.array([[5.0, 6.0, 100.0, 80.0]])
    expected_box = reference.transform_boxes(torch.tensor(box), normalize=True, orig_hw=image.shape[:2])
    np.testing.assert_allclose(transform_boxes(box, image.shape[:2], spec), expected_box.reshape(-1, 4).numpy(),
                               atol=1e-4)
    low = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(upscale_logits(low, spec, input_size, image.shape[:2]),
                               reference.postprocess_masks(low, image.shape[:2]), atol=0, rtol=0)
    assert spec.preprocess_version != SPECS["tiny"].preprocess_version
    assert SPECS["tiny"].preprocess_version == "imagenet-pilbilinear-128-v1"  # SAM 1 unchanged


# ---------------------------------------------------------------------------------------------- checkpoints
def test_tiny_sam2_checkpoint_round_trip_ignores_video_keys_and_names_bad_keys(tiny2, tmp_path):
    state = dict(tiny2.net.state_dict())
    video = {"memory_encoder.out_proj.weight": torch.zeros(2), "maskmem_tpos_enc": torch.zeros(1)}
    assert all(name.startswith(VIDEO_ONLY_KEYS) for name in video)
    torch.save({"model": {**state, **video}}, tmp_path / "ok.pt")
    assert build_tiny_sam2(checkpoint=tmp_path / "ok.pt", seed=3).model_id == tiny2.model_id
    missing = {k: v for k, v in state.items() if k != "no_mem_embed"}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match="missing.*no_mem_embed"):
        build_tiny_sam2(checkpoint=tmp_path / "missing.pt")
    torch.save({"model": {**state, "memory_bank.weight": torch.zeros(1)}}, tmp_path / "extra.pt")
    with pytest.raises(ModelLoadError, match="unexpected.*memory_bank.weight"):
        build_tiny_sam2(checkpoint=tmp_path / "extra.pt")


def test_official_models_need_a_checkpoint():
    with pytest.raises(ModelLoadError, match="sam2.1_hiera_t needs a checkpoint"):
        load_model("sam2.1_hiera_t")


def test_an_adapter_of_the_other_family_is_refused_naming_both_models(tiny2, tiny_model, tmp_path):
    sam1_adapter = save_perturbed_adapter(tiny_model, "decoder", tmp_path / "sam1")
    sam2_adapter = save_perturbed_adapter(tiny2, "decoder", tmp_path / "sam2")
    assert read_adapter_config(sam1_adapter).base_family == "sam1"
    for base, folder, other in ((tiny2, sam1_adapter, tiny_model), (tiny_model, sam2_adapter, tiny2)):
        with pytest.raises(AdapterInvalid) as raised:
            load_adapter(base, folder)
        message = str(raised.value)
        assert base.model_id in message and other.model_id in message and "family" in message


# Every SAM 2.1 size, and the smallest of the SAM 2 generation: the sizes of one generation differ only in
# depth and width, so the large SAM 2 configs add minutes of random initialisation and no new key.
CHECKED_CONFIGS = sorted(name for name in SAM2_CONFIGS if name.startswith("sam2.1_")) + ["sam2_hiera_t"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKED_CONFIGS)
def test_every_config_has_the_official_image_keys_and_shapes(name):
    """An official checkpoint of every size loads: our state dict is the official SAM2Base's minus exactly the
    video-only keys."""
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sam_core.modeling.sam2 import POSTPROCESSING_OVERRIDES, from_config, image_state

    cfg = compose(config_name=SAM2_CONFIGS[name], overrides=list(POSTPROCESSING_OVERRIDES))
    OmegaConf.resolve(cfg)
    official = {k: v.shape for k, v in instantiate(cfg.model, _recursive_=True).state_dict().items()}
    ours = {k: v.shape for k, v in from_config(SAM2_CONFIGS[name]).state_dict().items()}
    assert image_state(official) == ours
    assert set(official) - set(ours) and all(k.startswith(VIDEO_ONLY_KEYS) for k in set(official) - set(ours))
