"""The re-associated mask decoder equals segment_anything's MaskDecoder on every prompt kind."""

import pytest
import torch

from sam_core.modeling.fast_decoder import FastMaskDecoder


def _prompts(sam, n: int, kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = sam.prompt_encoder.input_image_size[0]
    xy = torch.rand(n, 2, generator=g) * size * 0.6
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * size * 0.3], dim=1)
    coords = torch.rand(n, 3, 2, generator=g) * size
    labels = torch.randint(0, 2, (n, 3), generator=g)
    low = sam.prompt_encoder.mask_input_size[0]
    masks = torch.randn(n, 1, low, low, generator=g) * 4
    points = (coords, labels) if kind in ("points", "box+points") else None
    return sam.prompt_encoder(points=points, boxes=boxes if "box" in kind else None,
                              masks=masks if kind == "box+mask" else None)


def _features(sam, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = sam.image_encoder.img_size
    with torch.inference_mode():
        return sam.image_encoder(torch.randn(1, 3, size, size, generator=g))


@pytest.mark.parametrize("kind", ["box", "points", "box+points", "box+mask"])
@pytest.mark.parametrize("multimask", [False, True])
def test_matches_eager_mask_decoder(tiny_model, kind, multimask):
    sam = tiny_model.net.eval()
    features = _features(sam)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = _prompts(sam, 5, kind)
        ref_masks, ref_iou = sam.mask_decoder(features, pe, sparse, dense, multimask)
        fast = FastMaskDecoder(sam, chunk=2)  # chunks of 2, 2, 1: exercises the boundaries
        shared_dense = dense[:1] if kind != "box+mask" else dense
        masks, iou = fast(features, pe, sparse, shared_dense, multimask)
    assert masks.shape == ref_masks.shape and iou.shape == ref_iou.shape
    torch.testing.assert_close(masks, ref_masks, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-4)


def test_per_prompt_dense_equals_shared_dense(tiny_model):
    """The shared-first-layer path and the fully per-prompt path agree."""
    sam = tiny_model.net.eval()
    features = _features(sam, seed=1)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = _prompts(sam, 4, "box", seed=1)
        fast = FastMaskDecoder(sam)
        shared = fast(features, pe, sparse, dense[:1], False)
        per_prompt = fast(features, pe, sparse, dense.contiguous(), False)
    torch.testing.assert_close(shared[0], per_prompt[0], atol=1e-5, rtol=1e-4)


def test_reads_live_weights(tiny_model):
    """Weights changed after construction (a loaded adapter, a training step) are used."""
    import copy

    sam = copy.deepcopy(tiny_model.net).eval()
    fast = FastMaskDecoder(sam)
    features = _features(sam)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = _prompts(sam, 2, "box")
        before = fast(features, pe, sparse, dense[:1], False)[0]
        bias = sam.mask_decoder.output_upscaling[0].bias  # not a constant shift: the LayerNorm after it removes one
        bias.add_(torch.linspace(-0.5, 0.5, bias.numel()))
        after = fast(features, pe, sparse, dense[:1], False)[0]
        ref = sam.mask_decoder(features, pe, sparse, dense, False)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 4])  # 4: the low-rank upscaling, whose per-call product is remembered too
def test_remembered_first_block_is_reused_only_while_embedding_and_weights_are_unchanged(tiny_model, n):
    """Consecutive calls on one embedding reuse the first block's shared products; another embedding, another
    dense prompt or any decoder weight changed in place gives what a fresh decoder gives, never stale values."""
    import copy

    sam = copy.deepcopy(tiny_model.net).eval()
    fast = FastMaskDecoder(sam)
    pe = sam.prompt_encoder.get_dense_pe()
    a, b = _features(sam, seed=3), _features(sam, seed=4)

    def fresh(features, sparse, dense):
        return FastMaskDecoder(sam)(features, pe, sparse, dense, False)

    with torch.inference_mode():
        sparse, dense = _prompts(sam, n, "box", seed=5)
        first = fast(a, pe, sparse, dense[:1], False)
        remembered = fast._memo
        assert remembered is not None
        again = fast(a, pe, sparse.flip(0), dense[:1], False)  # other prompts, same embedding
        assert fast._memo is remembered  # a hit: nothing recomputed or replaced
        torch.testing.assert_close(again[0], fresh(a, sparse.flip(0), dense[:1])[0], atol=0, rtol=0)
        other = fast(b, pe, sparse, dense[:1], False)  # another embedding
        assert fast._memo is not remembered
        torch.testing.assert_close(other[0], fresh(b, sparse, dense[:1])[0], atol=0, rtol=0)
        for weight in (sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight,
                       sam.mask_decoder.output_upscaling[0].weight,
                       sam.prompt_encoder.no_mask_embed.weight):  # dense[:1] is a view of it: same storage
            before = fast(b, pe, sparse, dense[:1], False)[0]
            weight.add_(0.05 * torch.randn_like(weight))  # a training step / an adapter loaded in place
            after = fast(b, pe, sparse, dense[:1], False)[0]
            assert not torch.allclose(before, after)
            torch.testing.assert_close(after, fresh(b, sparse, dense[:1])[0], atol=0, rtol=0)
        changed_dense = dense[:1] + 1.0  # another dense prompt embedding (new storage)
        torch.testing.assert_close(fast(b, pe, sparse, changed_dense, False)[0],
                                   fresh(b, sparse, changed_dense)[0], atol=0, rtol=0)
    assert first[0].shape == again[0].shape
    with torch.enable_grad():  # autograd (training) never reads or writes the memo
        memo = fast._memo
        fast.forward(b, pe, sparse.detach(), dense[:1].detach(), False)
        assert fast._memo is memo


def test_refuses_unknown_upscaling(tiny_model):
    import copy

    sam = copy.deepcopy(tiny_model.net)
    sam.mask_decoder.output_upscaling = torch.nn.Sequential(torch.nn.Identity())
    with pytest.raises(TypeError, match="output_upscaling"):
        FastMaskDecoder(sam)


@pytest.mark.integration
def test_litemedsam_boxes_match_eager(litemedsam_model):
    sam = litemedsam_model.net.eval()
    features = _features(sam)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = _prompts(sam, 20, "box", seed=3)
        ref_masks, ref_iou = sam.mask_decoder(features, pe, sparse, dense, False)
        masks, iou = FastMaskDecoder(sam)(features, pe, sparse, dense[:1], False)
    scale = ref_masks.abs().amax().item()
    assert (masks - ref_masks).abs().amax().item() <= 1e-5 * max(scale, 1.0)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("multimask", [False, True])
def test_low_rank_upscaling_and_tiles_match_dense(tiny_model, monkeypatch, multimask):
    """The low-rank first upscaling layer and odd tile sizes change nothing beyond float rounding."""
    import sam_core.modeling.fast_decoder as fd

    sam = tiny_model.net.eval()
    features = _features(sam, seed=2)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = _prompts(sam, 6, "box+points", seed=2)
        ref_masks, ref_iou = sam.mask_decoder(features, pe, sparse, dense, multimask)
        fast = FastMaskDecoder(sam, chunk=4)
        results = {}
        for name, min_prompts, tile in [("low-rank", 1, 1024), ("dense", 10**6, 1024), ("low-rank, tile 24", 1, 24),
                                        ("dense, tile 24", 10**6, 24)]:
            monkeypatch.setattr(fd, "LOWRANK_MIN_PROMPTS", min_prompts)
            monkeypatch.setattr(fd, "UPSCALE_TILE", tile)
            results[name] = fast(features, pe, sparse, dense[:1], multimask)
    for masks, iou in results.values():
        torch.testing.assert_close(masks, ref_masks, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-4)


def test_autograd_forward_matches_inference(tiny_model):
    """Training calls forward() with autograd (vectorised upscaling): same outputs as inference, and a gradient."""
    import copy

    sam = copy.deepcopy(tiny_model.net).eval().requires_grad_(True)
    features = _features(sam, seed=3)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = _prompts(sam, 5, "box", seed=3)
    fast = FastMaskDecoder(sam)
    with torch.inference_mode():
        ref_masks, _ = fast(features, pe, sparse, dense[:1], False)
    masks, _ = fast.forward(features.clone(), pe.clone(), sparse.clone(), dense.clone(), False)
    torch.testing.assert_close(masks.detach(), ref_masks, atol=1e-5, rtol=1e-4)
    masks.sum().backward()
    assert sam.mask_decoder.output_upscaling[0].weight.grad is not None
