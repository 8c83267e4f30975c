"""``decoder``: the mask decoder only; the image encoder is frozen, so training runs on cached embeddings and
the adapter serves from the base model's embeddings."""

from __future__ import annotations

from sam_core.training.methods.base import DEFAULT_METHOD, FineTuningMethod


class DecoderMethod(FineTuningMethod):
    name = DEFAULT_METHOD
    summary = "mask decoder only (encoder frozen; trains on cached embeddings)"

