"""Decoder-side adapters: :class:`~services.common.adapter_models.AdapterModels` with one change.

The encoder resolves a decoder-only adapter to the base model (its embeddings are the base ones); the decoder
must decode with the adapter's mask decoder for *every* adapter. :class:`DecoderAdapters` therefore returns a
handle carrying the version for decoder-only adapters too, and everything else is inherited: per-tenant
resolution through the registry (cached, dropped on every registry revision, so alias moves are served
without a restart), the cheap checks (content sha256, config, base model) before anything is evicted, and
the LRU of ``SAMFORGE_ADAPTER_CACHE`` loaded models that evicts *before* loading. The ``make_predictor``
given to it builds the adapted model's decoder (an ONNX export per adapter, cached on disk by weights).

``handle.encoder_adapter`` is None for decoder-only adapters (decode against base embeddings) and the
adapter id for encoder-side ones (their embeddings come from the encoder with that adapter).
"""

from __future__ import annotations

from sam_core.adapters.store import AdapterRef
from services.common.adapter_models import BASE, AdapterModels, ModelHandle


class DecoderAdapters(AdapterModels):
    """Resolve ``(tenant, ref)`` to the handle whose predictor decodes it (see the module docstring)."""

    def resolve(self, tenant: str, ref: str) -> ModelHandle:
        if not ref:
            return BASE
        AdapterRef.parse(ref)  # a malformed reference (e.g. path traversal) is INVALID_ARGUMENT, registry or not
        version = self._version(tenant, ref)
        if version.base_model_id != self.base.model_id:
            self._reject(f"adapter {version.ref!r} was trained on {version.base_model_id}, this decoder serves "
                         f"{self.base.model_id}")
        identity = self._identity(version)  # checked config (persam and wrong bases are rejected here)
        encoder_adapter = None if version.shares_base_embeddings else identity
        return ModelHandle(encoder_adapter, f"{version.tenant}/{version.ref}", version)


def encoder_ref(handle: ModelHandle) -> str:
    """The exact reference ("name:N") the encoder must embed with; "" for base embeddings.

    An exact version, not the client's alias: an alias moving between the two resolutions must not pair
    one version's embeddings with another version's decoder.
    """
    if handle.adapter is None or handle.encoder_adapter is None:
        return ""
    return handle.adapter.ref


def served_ref(handle: ModelHandle) -> str:
    """What the reply reports: "name:N", or "" for the base model."""
    return "" if handle.adapter is None else handle.adapter.ref
