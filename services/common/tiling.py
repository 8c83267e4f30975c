"""The tiling a client asks for, shared by the encoder (which embeds tiles) and the decoder (which forwards it).

Both services build it from ``sam.v1.TilingOptions``; the encoder validates it and applies the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TilingRequest:
    """Tiling asked for by a client: 0 means the default (model input size / 64 px overlap)."""

    tile_size: int = 0
    overlap: int = 0
