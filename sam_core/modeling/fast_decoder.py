"""SAM's mask decoder re-associated for many prompts on one image embedding.

Same weights and the same mathematics as ``segment_anything.modeling.MaskDecoder`` (outputs agree
to float32 rounding, see tests/sam_core/test_fast_decoder.py) but about a third of the FLOPs per
prompt, because SAM's decoder attends between ~7 prompt tokens and 4096 image tokens and the eager
module pays for the 4096-side projections once per prompt:

* **Shared first layer.** With no mask input every prompt starts from the same image tokens, so the
  first block's key/value projections (token->image) and query projection (image->token) are
  computed once per call instead of once per prompt (``repeat_interleave`` in the original), and kept
  for the next call while the embedding, dense prompt and decoder weights are the same ones (one prompt
  per call on one image, as interactive clients send: ~41 -> ~32 ms per one-box call here).
* **Re-associated attention** wherever image tokens are per-prompt. For a head h with projections
  ``W_h``: ``softmax((q W_q,h)(K W_k,h + b_k,h)^T) (K W_v,h + b_v,h)`` equals
  ``softmax((q W_q,h W_k,h^T) K^T) K W_v,h + b_v,h`` (the key bias shifts every logit of a query
  equally; softmax rows sum to one), so the 4096 x 256 x 128 projections become products with the
  7 tokens. Likewise the image->token output projection ``concat_h(P_h V_h) W_o`` becomes
  ``sum_h P_h (V_h W_o,h)``.
* **Final attention for the rows read.** Only the IoU token and the returned mask tokens leave the
  decoder, and attention, its output projection and the LayerNorm act per query row, so the final
  token->image attention runs for 2 of the ~7 tokens (4 with multimask).
* **Upscaling as matrix products** in channels-last layout: each 2x2/stride-2 transposed convolution
  is a Linear to (2, 2, C_out) per pixel; the pixel shuffle happens once, on the final masks only.
  At inference it runs per prompt in tiles of image tokens, so its LayerNorm/GELU intermediates stay
  in cache; and (shared first-layer tokens, >= ``LOWRANK_MIN_PROMPTS`` prompts) its first Linear is
  unrolled through the blocks' LayerNorms into a per-call product plus a rank-~116 per-prompt part
  (:meth:`FastMaskDecoder._conv1_factors`).

Per prompt at 64 x 64 tokens this is ~1.6 GFLOP against ~3.6 GFLOP eager (see
``../shared/ARCHITECTURE.md`` for the floor). Training keeps the eager module (autograd, adapters);
this path is inference-only and rebuilt when the decoder weights change (it reads them live).

**SAM 2 / 2.1** (:meth:`FastMaskDecoder.for_decoder` of ``sam2``'s ``MaskDecoder``): the same two-way
transformer, so every identity above holds unchanged. Its differences leave the algebra alone: an
object-score token before the IoU token (``pred_obj_scores``; never read, so the final attention skips it);
``use_high_res_features`` upscaling ``act1(LN(convT1(src) + s1))``, ``act2(convT2(.) + s0)`` with the image's
stride-8 / stride-4 features (``high_res``): per-pixel terms shared by every prompt, added after the Linears
and before the LayerNorm / GELU, so the transposed convolutions stay per-pixel Linears (s1, s0 reordered once
per call to the tiles' rows) and the low-rank first layer still gives exactly ``keys_last W + a``; the eval-mode
single-mask stability fallback needs every mask token (``all_masks``; ``sam2.Sam2FastDecoding`` selects).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, TypeAlias, TypedDict, overload

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from segment_anything.modeling import Sam
    from segment_anything.modeling.mask_decoder import MaskDecoder
    from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

DEFAULT_CHUNK = 16  # prompts per pass: bounds memory (per prompt ~4 MB per image-token tensor at 64 x 64)
LOWRANK_MIN_PROMPTS = 4  # the low-rank first upscaling layer costs one dense N x C x 4C1 product per call
UPSCALE_TILE = 1024  # image tokens per output-upscaling step (inference): intermediates stay in L2


class _SharedCache(TypedDict, total=False):
    """Products of one call on the image tokens shared by every prompt (empty when they are per-prompt)."""

    keys0: torch.Tensor  # 1 x N x C: features + dense, flattened
    k0: torch.Tensor  # keys0 + positional encoding
    i2t_q: torch.Tensor  # shared_q of the first block's image->token attention
    t2i_kv: tuple[torch.Tensor, torch.Tensor]  # shared_kv of the first block's token->image attention
    conv1_s: torch.Tensor  # S of FastMaskDecoder._conv1_factors, computed on first use


# what the shared products depend on (FastMaskDecoder._signature): ids of the embedding and positional encoding,
# (data_ptr, version, stride, shape) of the dense prompt, (id, version) of every decoder parameter
_Signature: TypeAlias = tuple[int, int, tuple[int, int, tuple[int, ...], tuple[int, ...]], tuple[tuple[int, int], ...]]
# held by the memo so that the ids in its signature stay unique: features, image_pe, dense, decoder parameters
_Pinned: TypeAlias = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[nn.Parameter]]
# per block of a low-rank pass: P, U (image_to_token factors), LayerNorm mean and rstd, the LayerNorm (norm4)
_TraceEntry: TypeAlias = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, nn.LayerNorm]
# FastMaskDecoder._conv1_factors: (S, scale, blocks [(P_l, c_l)], small, R)
_Conv1Factors: TypeAlias = tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor,
                                torch.Tensor]
# FastMaskDecoder._high_res_rows: SAM 2's (s1 as Bh x N x 4*C1, s0 as Bh x 4N x 4*C2), Bh = 1 (shared) or B
_HighRes: TypeAlias = tuple[torch.Tensor, torch.Tensor]


def _batch_slice(high_res: _HighRes | None, start: int, size: int) -> _HighRes | None:
    """Prompts ``start:start + size`` of per-prompt high-res rows (shared rows, batch 1, are kept whole)."""
    if high_res is None or high_res[0].shape[0] == 1:
        return high_res
    return high_res[0][start:start + size], high_res[1][start:start + size]


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """B x T x (H*d) -> H x (B*T) x d (prompt batch folded into the rows of each head's matrix)."""
    b, t, c = x.shape
    return x.reshape(b * t, n_heads, c // n_heads).transpose(0, 1)


def _unheads(x: torch.Tensor, b: int) -> torch.Tensor:
    """H x (B*T) x d -> B x T x (H*d)."""
    h, bt, d = x.shape
    return x.transpose(0, 1).reshape(b, bt // b, h * d)


def token_to_image(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   kv_shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """segment_anything ``Attention`` with few queries and many keys.

    q: B x T x C (tokens); k, v: Bk x N x C image tokens, Bk = 1 (shared by all B prompts) or B.
    ``kv_shared``: :func:`shared_kv` of (k, v) when Bk = 1, precomputed once per call.
    Returns B x T x C.
    """
    n_heads: int = attn.num_heads
    b, t, c = q.shape
    qp: torch.Tensor = attn.q_proj(q)  # B x T x H*d
    d = qp.shape[-1] // n_heads
    if k.shape[0] == 1 and (kv_shared is not None or b > 1):
        # image tokens shared by several prompts: projected once per call (the eager module: once per prompt).
        # One prompt's own tokens take the re-associated path below: H*T x C products instead of C x C/r
        # projections, and H*T rows per GEMM (accumulating over N with 2-3 rows is ~5x less accurate here)
        kt, vh = kv_shared if kv_shared is not None else shared_kv(attn, k, v)  # H x d x N, H x N x d
        logits = torch.bmm(_heads(qp / math.sqrt(d), n_heads), kt)  # H x B*T x N
        out = torch.bmm(torch.softmax(logits, dim=-1), vh)  # H x B*T x d
        shared_out: torch.Tensor = attn.out_proj(_unheads(out, b))
        return shared_out
    wk: torch.Tensor = attn.k_proj.weight.reshape(n_heads, d, c)  # H x d x C
    wv: torch.Tensor = attn.v_proj.weight.reshape(n_heads, d, c)
    qk = torch.einsum("bthd,hdc->bhtc", qp.reshape(b, t, n_heads, d) / math.sqrt(d), wk).reshape(b, n_heads * t, c)
    logits = torch.bmm(qk, k.transpose(1, 2))  # B x H*T x N; the key bias cancels in softmax
    pk = torch.bmm(torch.softmax(logits, dim=-1), v)  # B x H*T x C
    out = torch.einsum("bhtc,hdc->bthd", pk.reshape(b, n_heads, t, c), wv).reshape(b, t, n_heads * d)
    result: torch.Tensor = attn.out_proj(out + attn.v_proj.bias)
    return result


def shared_kv(attn: Attention, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected shared image tokens for :func:`token_to_image`: 1 x N x C -> (H x d x N keys, H x N x d values)."""
    n_heads: int = attn.num_heads
    kt = _heads(attn.k_proj(k), n_heads).transpose(1, 2).contiguous()
    return kt, _heads(attn.v_proj(v), n_heads).contiguous()


def shared_q(attn: Attention, q: torch.Tensor) -> torch.Tensor:
    """Projected shared image tokens for :func:`image_to_token`: 1 x N x C -> H x d x N."""
    return _heads(attn.q_proj(q), attn.num_heads).transpose(1, 2).contiguous()


@overload
def image_to_token(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor,
                   q_shared: torch.Tensor | None = None, *, factors: Literal[False] = False) -> torch.Tensor: ...


@overload
def image_to_token(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor,
                   q_shared: torch.Tensor | None = None, *, factors: Literal[True]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def image_to_token(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor,
                   q_shared: torch.Tensor | None = None, *, factors: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual + Attention(q, k, v)`` for many queries (image tokens) and few keys (prompt tokens).

    q, residual: Bq x N x C image tokens (Bq = 1 shared by all prompts, or B); k, v: B x T x C tokens.
    ``q_shared`` is :func:`shared_q` of q when Bq = 1, precomputed once per call. Returns B x N x C,
    or with ``factors`` (out, P, U) where out = residual + P^T U, P: B x H*T x N, U: B x H*T x C.

    Logits are laid out B x H x T x N so the softmax runs over a non-innermost axis of length T
    (vectorised along N; a softmax over an innermost axis of 7 is ~7x slower on CPU). The output
    projection is re-associated per head (``P_h (V_h W_o,h)``) and its bias folded into those rows
    (each head's probabilities sum to one); the residual add happens inside the final GEMM.
    """
    n_heads: int = attn.num_heads
    b, t, c = k.shape
    n = q.shape[1]
    kp: torch.Tensor = attn.k_proj(k)  # B x T x H*d
    d = kp.shape[-1] // n_heads
    kh = kp.reshape(b, t, n_heads, d) / math.sqrt(d)
    if q.shape[0] == 1 and (q_shared is not None or b > 1):  # shared image tokens (see token_to_image)
        qt = q_shared if q_shared is not None else shared_q(attn, q)  # H x d x N
        logits = torch.bmm(kh.permute(2, 0, 1, 3).reshape(n_heads, b * t, d), qt)  # H x B*T x N
        p = torch.softmax(logits.reshape(n_heads, b, t, n), dim=2).transpose(0, 1).reshape(b, n_heads * t, n)
    else:
        wq: torch.Tensor = attn.q_proj.weight.reshape(n_heads, d, c)  # H x d x C
        m = torch.einsum("hdc,bthd->bhtc", wq, kh).reshape(b, n_heads * t, c)
        bias = torch.einsum("hd,bthd->bht", attn.q_proj.bias.reshape(n_heads, d), kh).reshape(b, n_heads * t, 1)
        logits = torch.baddbmm(bias, m, q.transpose(1, 2))  # B x H*T x N
        p = torch.softmax(logits.reshape(b, n_heads, t, n), dim=2).reshape(b, n_heads * t, n)
    wo: torch.Tensor = attn.out_proj.weight.reshape(c, n_heads, d)  # C x H x d
    u = torch.einsum("bthd,chd->bhtc", attn.v_proj(v).reshape(b, t, n_heads, d), wo)
    u = (u + attn.out_proj.bias / n_heads).reshape(b, n_heads * t, c)
    out = torch.baddbmm(residual, p.transpose(1, 2), u)
    return (out, p, u) if factors else out


class FastMaskDecoder:
    """Inference-only re-associated view of a ``Sam``'s mask decoder (reads its weights live).

    ``__call__(features, image_pe, sparse, dense, multimask)`` takes what ``MaskDecoder.forward``
    takes, except that ``dense`` may be 1 x C x h x w (no mask input: shared by every prompt):
    features: 1 x C x h x w (or B x C x h x w: one embedding per prompt, as in training);
    image_pe: 1 x C x h x w; sparse: B x P x C; dense: 1 or B x C x h x w.
    Returns (B x M x 4h x 4w low-res logits, B x M IoU predictions), M = 3 if multimask else 1.
    ``__call__`` runs under inference mode; :meth:`forward` is the same computation with autograd
    (the decoder fine-tuning step: about half the FLOPs of the eager module, forward and backward).
    """

    def __init__(self, sam: Sam, *, chunk: int = DEFAULT_CHUNK) -> None:
        self._bind(sam.mask_decoder, chunk)

    @classmethod
    def for_decoder(cls, decoder: nn.Module, *, chunk: int = DEFAULT_CHUNK) -> FastMaskDecoder:
        """The fast view of a mask decoder module itself: SAM's or SAM 2's (see the module docstring)."""
        fast = cls.__new__(cls)
        fast._bind(decoder, chunk)
        return fast

    def _bind(self, decoder: MaskDecoder, chunk: int) -> None:
        self.decoder = decoder
        self.transformer: TwoWayTransformer = self.decoder.transformer
        self.lead = 1 if getattr(decoder, "pred_obj_scores", False) else 0  # SAM 2: object-score token first
        self.chunk = chunk
        # (signature, shared first-block products, pinned tensors) of the last inference call: a client sending
        # one prompt per call on the same embedding (interactive clicks) skips the 4096-token projections
        self._memo: tuple[_Signature, _SharedCache, _Pinned] | None = None
        ups = self.decoder.output_upscaling
        if len(ups) != 5 or not isinstance(ups[0], nn.ConvTranspose2d) or not isinstance(ups[3], nn.ConvTranspose2d):
            raise TypeError("FastMaskDecoder expects SAM's ConvT-LN-act-ConvT-act output_upscaling")

    @staticmethod
    def _conv_t_as_linear(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
        """Cin x Cout x 2 x 2 transposed conv -> (Cin x (2*2*Cout) weight, bias) ordered (ki, kj, cout)."""
        if conv.bias is None:
            raise TypeError("FastMaskDecoder expects output_upscaling's transposed convolutions with a bias")
        w = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)
        return w, conv.bias.repeat(4)

    @torch.inference_mode()
    def __call__(self, features: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                 dense: torch.Tensor, multimask: bool, *, high_res: tuple[torch.Tensor, torch.Tensor] | None = None,
                 all_masks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(features, image_pe, sparse, dense, multimask, high_res=high_res, all_masks=all_masks)

    def forward(self, features: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, multimask: bool, *, high_res: tuple[torch.Tensor, torch.Tensor] | None = None,
                all_masks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``high_res``: SAM 2's (s0 Bh x C/8 x 4h x 4w, s1 Bh x C/4 x 2h x 2w), Bh = 1 or B (exactly when the
        decoder ``use_high_res_features``). ``all_masks``: every mask token's output (single-mask token first)."""
        if getattr(self.decoder, "use_high_res_features", False) != (high_res is not None):
            raise ValueError("high_res features must be given exactly when the decoder uses them")
        first: TwoWayAttentionBlock = self.transformer.layers[0]
        pe = image_pe.flatten(2).transpose(1, 2)  # 1 x N x C
        shared = dense.shape[0] == 1 and features.shape[0] == 1
        signature = self._signature(features, image_pe, dense) if shared else None
        memo = self._memo
        if signature is not None and memo is not None and memo[0] == signature:
            cache = memo[1]  # the same embedding, dense prompt, positional encoding and weights as the last call
            keys0 = cache["keys0"]
        else:
            keys0 = (features + dense).flatten(2).transpose(1, 2)  # 1 or B x N x C
            cache = {}
            if shared:  # per-call work on the shared image tokens (first block)
                cache["keys0"] = keys0
                cache["k0"] = k0 = keys0 + pe
                cache["i2t_q"] = shared_q(first.cross_attn_image_to_token, k0)
                cache["t2i_kv"] = shared_kv(first.cross_attn_token_to_image, k0, keys0)
            if signature is not None:  # holding the tensors and parameters pins what the signature names
                self._memo = (signature, cache, (features, image_pe, dense, list(self.decoder.parameters())))
        lowrank = shared and sparse.shape[0] >= LOWRANK_MIN_PROMPTS and self._lowrank_ok()
        hw = (features.shape[-2], features.shape[-1])
        rows = self._high_res_rows(high_res, hw)
        outputs = [self._chunk(sparse[s:s + self.chunk], keys0 if shared else keys0[s:s + self.chunk], pe,
                               cache, (multimask, all_masks), hw, lowrank, _batch_slice(rows, s, self.chunk))
                   for s in range(0, sparse.shape[0], self.chunk)]
        masks, iou = zip(*outputs, strict=True)
        return torch.cat(masks), torch.cat(iou)

    def _signature(self, features: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor) -> _Signature | None:
        """What the shared first-block products depend on: the embedding and positional encoding (by identity;
        embeddings are never modified in place), the dense prompt (its storage and version: the no-mask
        embedding is a view of a parameter) and every decoder parameter's identity and version (training,
        load_state_dict). None when they cannot be told apart (autograd on, or an inference tensor among them:
        no version counter), and then nothing is remembered."""
        if torch.is_grad_enabled():
            return None
        try:
            weights = tuple((id(w), w._version) for w in self.decoder.parameters())
            dense_key = (dense.data_ptr(), dense._version, tuple(dense.stride()), tuple(dense.shape))
        except RuntimeError:  # inference tensors have no version counter
            return None
        return id(features), id(image_pe), dense_key, weights

    @staticmethod
    def _high_res_rows(high_res: tuple[torch.Tensor, torch.Tensor] | None, hw: tuple[int, int]) -> _HighRes | None:
        """SAM 2's (s0, s1) as the rows added to each transposed convolution's Linear output: s1 as Bh x N x
        (2*2*C1) ordered (token; ki, kj, c1), s0 as Bh x 4N x (2*2*C2) ordered (token, ki, kj; ki2, kj2, c2)."""
        if high_res is None:
            return None
        s0, s1 = high_res
        h, w = hw
        b0, c2, b1, c1 = s0.shape[0], s0.shape[1], s1.shape[0], s1.shape[1]
        s1_rows = s1.reshape(b1, c1, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(b1, h * w, 4 * c1)
        s0_rows = s0.reshape(b0, c2, h, 2, 2, w, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1).reshape(b0, 4 * h * w, 4 * c2)
        return s1_rows.contiguous(), s0_rows.contiguous()

    def _chunk(self, sparse: torch.Tensor, keys: torch.Tensor, pe: torch.Tensor, cache: _SharedCache,
               outputs: tuple[bool, bool], hw: tuple[int, int], lowrank: bool = False,
               high_res: _HighRes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of prompts; ``outputs``: (multimask, all_masks) of :meth:`forward`."""
        dec, tr = self.decoder, self.transformer
        b = sparse.shape[0]
        own = [dec.obj_score_token.weight] if self.lead else []  # [object score (SAM 2)], IoU, mask tokens
        output_tokens = torch.cat([*own, dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        queries, query_pe = tokens, tokens
        # inference with shared first-layer image tokens: record each block's P, U and LayerNorm
        # statistics so the first upscaling layer can skip the dense product (see _conv1_factors)
        trace: list[_TraceEntry] | None = [] if lowrank else None
        keys0 = keys
        for layer in tr.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            first = keys.shape[0] == 1 and layer is tr.layers[0] and "k0" in cache
            k = cache["k0"] if first else keys + pe
            t2i = token_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys,
                                 cache.get("t2i_kv") if first else None)
            queries = layer.norm2(queries + t2i)
            queries = layer.norm3(queries + layer.mlp(queries))
            q = queries + query_pe
            if trace is None:
                keys = layer.norm4(image_to_token(layer.cross_attn_image_to_token, k, q, queries, keys,
                                                  cache.get("i2t_q") if first else None))
            else:
                z, p, u = image_to_token(layer.cross_attn_image_to_token, k, q, queries, keys,
                                         cache.get("i2t_q") if first else None, factors=True)
                norm = layer.norm4
                keys, mean, rstd = torch.native_layer_norm(z, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                trace.append((p, u, mean, rstd, norm))
        # the final attention only for the tokens read below (attention, out_proj and the LayerNorm act per
        # query row): the IoU token and the mask tokens returned, 2 of SAM's T >= 6 rows (4 with multimask)
        multimask, all_masks = outputs
        mask_idx = list(range(0 if all_masks else 1, dec.num_mask_tokens)) if multimask or all_masks else [0]
        rows = [self.lead + i for i in (0, *(1 + i for i in mask_idx))]
        used = queries[:, rows]
        attn_out = token_to_image(tr.final_attn_token_to_image, used + query_pe[:, rows], keys + pe, keys)
        hs = tr.norm_final_attn(used + attn_out)  # B x len(rows) x C
        iou: torch.Tensor = dec.iou_prediction_head(hs[:, 0, :])
        sel = slice(None) if all_masks else slice(1, None) if multimask else slice(0, 1)
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, 1 + j, :]) for j, i in enumerate(mask_idx)],
                            dim=1)  # B x M x c8
        if trace is not None:
            masks = self._upscale_tiled(keys, hyper, hw, factors=self._conv1_factors(keys0, trace, cache),
                                        high_res=high_res)
        else:
            masks = self._upscale(keys, hyper, hw, high_res)
        return masks, iou[:, sel]

    def _lowrank_ok(self) -> bool:
        """The :meth:`_conv1_factors` path applies (given shared first-layer tokens): no autograd, LayerNorm blocks."""
        _, _, act1, _, act2 = self.decoder.output_upscaling
        return (not torch.is_grad_enabled() and isinstance(act1, nn.GELU) and isinstance(act2, nn.GELU)
                and all(isinstance(layer.norm4, nn.LayerNorm) and layer.norm4.weight is not None
                        and len(layer.norm4.normalized_shape) == 1 for layer in self.transformer.layers))

    def _conv1_factors(self, keys0: torch.Tensor, trace: list[_TraceEntry], cache: _SharedCache) -> _Conv1Factors:
        """The first upscaling layer (a per-token Linear W, bias a) of the transformer's output tokens,
        as ``scale * S + L R``: S shared by all prompts, L R of rank ~ blocks x (H*T + 2).

        Block l ends with keys_l = LN_l(z_l), z_l = keys_{l-1} + P_l^T U_l (its image->token attention,
        :func:`image_to_token` with ``factors``), keys_0 = ``keys0`` shared. With per-token mean mu_l,
        inverse std r_l and affine (g_l, b_l), and W'_l = diag(g_l) W_l, W_{l-1} = W'_l from W_last = W:
          keys_l W_l = r_l (keys_{l-1} W'_l + P_l^T U_l W'_l) - r_l mu_l (1^T W'_l) + b_l W_l,
        so with c_l = r_l ... r_last (c after the last block = 1):
          keys_last W + a = c_1 (keys0 W'_1) + sum_l [c_l P_l^T (U_l W'_l) - c_l mu_l (1^T W'_l) + c_{l+1} b_l W_l] + a.
        S = keys0 W'_1 (N x 4C1) is computed once per call; per prompt this costs N x K x 4C1 instead of
        N x C x 4C1 multiply-adds (K = 116 vs C = 256 for SAM's two blocks with 7 tokens) and skips
        reading the transformer's output tokens.

        Returns (S, scale (B x N), blocks, small, R): L^T of one prompt i is ``[P_l[i] * c_l[i] for
        (P_l, c_l) in blocks] + [small[i]]`` stacked (K x N; built per prompt, in cache, by
        :meth:`_upscale_tiled`), small: B x k x N (the mean, bias and constant columns), R: B x K x 4C1.
        """
        w, a = self._conv_t_as_linear(self.decoder.output_upscaling[0])
        b, n = trace[0][0].shape[0], trace[0][0].shape[-1]
        blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        small: list[torch.Tensor] = []
        big_rows: list[torch.Tensor] = []
        small_rows: list[torch.Tensor] = []
        const = a  # multiplies c after the last block (= 1)
        c_next: torch.Tensor | None = None
        for p, u, mean, rstd, norm in reversed(trace):
            wg = norm.weight[:, None] * w
            c = rstd.squeeze(-1) if c_next is None else rstd.squeeze(-1) * c_next  # B x N
            if c_next is None:
                const = const + norm.bias @ w
            else:
                small.append(c_next)
                small_rows.append((norm.bias @ w).expand(b, -1))
            blocks.append((p, c))
            big_rows.append(torch.matmul(u, wg))
            small.append(-c * mean.squeeze(-1))
            small_rows.append(wg.sum(0).expand(b, -1))
            w, c_next = wg, c
        if c_next is None:
            raise ValueError("_conv1_factors needs the trace of at least one block")
        small.append(keys0.new_ones((b, n)))
        small_rows.append(const.expand(b, -1))
        if "conv1_s" not in cache:
            cache["conv1_s"] = torch.mm(keys0[0], w)
        right = torch.cat([*big_rows, torch.stack(small_rows, dim=1)], dim=1)
        return cache["conv1_s"], c_next, blocks, torch.stack(small, dim=1), right

    def _upscale(self, keys: torch.Tensor, hyper: torch.Tensor, hw: tuple[int, int],
                 high_res: _HighRes | None = None) -> torch.Tensor:
        """keys: B x N x C (N = h*w), hyper: B x M x C/8 -> B x M x 4h x 4w logits."""
        if torch.is_grad_enabled() and (keys.requires_grad or hyper.requires_grad):
            return self._upscale_vectorised(keys, hyper, hw, high_res)
        return self._upscale_tiled(keys, hyper, hw, high_res=high_res)

    def _upscale_tiled(self, keys: torch.Tensor, hyper: torch.Tensor, hw: tuple[int, int],
                       tile: int | None = None, factors: _Conv1Factors | None = None,
                       high_res: _HighRes | None = None) -> torch.Tensor:
        """:meth:`_upscale_vectorised` without autograd, ``tile`` image tokens of one prompt at a time.

        Per tile the intermediates (tile x 4*C1, 4*tile x 4*C2 floats) fit in L2, so the LayerNorm,
        both GELUs (in place) and the bias adds run from cache instead of streaming B x 16N x C2
        floats through memory; the buffers are reused across tiles. Same operations per element.
        ``factors``: :meth:`_conv1_factors`; the first layer is then scale * S + L R.
        ``high_res``: :meth:`_high_res_rows`, added to each layer's Linear output.
        """
        conv1, norm, act1, conv2, act2 = self.decoder.output_upscaling
        if not (isinstance(act1, nn.GELU) and isinstance(act2, nn.GELU)):
            return self._upscale_vectorised(keys, hyper, hw, high_res)
        h, w = hw
        b, n, _ = keys.shape
        m = hyper.shape[1]
        w1, b1 = self._conv_t_as_linear(conv1)
        w2, b2 = self._conv_t_as_linear(conv2)
        c1, c2 = conv1.weight.shape[1], conv2.weight.shape[1]
        tile = min(tile or UPSCALE_TILE, n)
        buf1 = keys.new_empty((tile, w1.shape[1]))  # tile x (2*2*C1)
        buf2 = keys.new_empty((4 * tile, w2.shape[1]))  # (tile*4) x (2*2*C2)
        flat = keys.new_empty((b, n * 16, m))  # order (i, j, ki, kj, ki2, kj2)
        hyper_t = hyper.transpose(1, 2)  # B x C2 x M
        if factors is not None:
            shared, scale, blocks, small, right = factors
            left_t = keys.new_empty((right.shape[1], n))  # one prompt's L^T
        for i in range(b):
            if factors is not None:
                row = 0
                for p, c in blocks:
                    torch.mul(p[i], c[i], out=left_t[row:row + p.shape[1]])
                    row += p.shape[1]
                left_t[row:].copy_(small[i])
            for s in range(0, n, tile):
                r = min(tile, n - s)
                if factors is None:
                    x = torch.addmm(b1, keys[i, s:s + r], w1, out=buf1[:r])
                else:
                    x = torch.mul(shared[s:s + r], scale[i, s:s + r, None], out=buf1[:r])
                    x.addmm_(left_t[:, s:s + r].t(), right[i])
                if high_res is not None:
                    x.add_(high_res[0][min(i, len(high_res[0]) - 1), s:s + r])
                x = x.view(4 * r, c1)
                x = F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps)
                torch.ops.aten.gelu_(x, approximate=act1.approximate)
                y = torch.mm(x, w2, out=buf2[:4 * r]).add_(b2)
                if high_res is not None:
                    y.add_(high_res[1][min(i, len(high_res[1]) - 1), 4 * s:4 * (s + r)])
                torch.ops.aten.gelu_(y, approximate=act2.approximate)
                torch.mm(y.view(16 * r, c2), hyper_t[i], out=flat[i, 16 * s:16 * (s + r)])
        masks = flat.reshape(b, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(b, m, 4 * h, 4 * w)

    def _upscale_vectorised(self, keys: torch.Tensor, hyper: torch.Tensor, hw: tuple[int, int],
                            high_res: _HighRes | None = None) -> torch.Tensor:
        """keys: B x N x C (N = h*w), hyper: B x M x C/8 -> B x M x 4h x 4w logits (autograd-friendly)."""
        ups = self.decoder.output_upscaling
        conv1, norm, act1, conv2, act2 = ups
        h, w = hw
        b, m = hyper.shape[:2]
        w1, b1 = self._conv_t_as_linear(conv1)
        w2, b2 = self._conv_t_as_linear(conv2)
        c1, c2 = conv1.weight.shape[1], conv2.weight.shape[1]
        x = torch.addmm(b1, keys.reshape(-1, keys.shape[-1]), w1)  # (B*N) x (4*C1)
        if high_res is not None:
            x = (x.reshape(b, -1, x.shape[-1]) + high_res[0]).reshape(-1, x.shape[-1])
        x = act1(F.layer_norm(x.reshape(-1, c1), (c1,), norm.weight, norm.bias, norm.eps))  # (B*N*4) x C1
        y = torch.addmm(b2, x, w2)  # (B*N*4) x (4*C2)
        if high_res is not None:
            y = (y.reshape(b, -1, y.shape[-1]) + high_res[1]).reshape(-1, y.shape[-1])
        x = act2(y).reshape(b, -1, c2)  # B x (N*16) x C2, order (i, j, ki, kj, ki2, kj2)
        masks = torch.bmm(x, hyper.transpose(1, 2))  # B x (N*16) x M
        masks = masks.reshape(b, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(b, m, 4 * h, 4 * w)
