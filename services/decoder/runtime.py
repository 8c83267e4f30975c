"""Which runtime decodes: PyTorch (default: the re-associated FastMaskDecoder, fastest on CPU) or ONNX Runtime
(``SAMFORGE_DECODER_RUNTIME=onnx``).

With ``onnx`` every model (the base and each adapted model) gets an :class:`~sam_core.export.onnx_decoder.OnnxPredictor`
whose graph is exported once into ``SAMFORGE_ONNX_CACHE_DIR`` under a name keyed by the decoder weights, so
a restart or a second replica on the same volume reuses the file. When ``onnxruntime`` is not installed the
service falls back to PyTorch (logged), which gives the same masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sam_core.inference.predictor import Predictor
from sam_core.modeling.registry import LoadedModel

log = logging.getLogger("samforge.decoder.runtime")


@dataclass(frozen=True)
class Runtime:
    """``name``: "onnx" or "torch"; ``make(model)`` builds the predictor that decodes for ``model``."""

    name: str
    make: Callable[[LoadedModel], Predictor]


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` imports (installed *and* loadable: a broken native library counts as missing)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def select_runtime(requested: str, *, device: str = "cpu", max_prompts: int = 256, cache_dir: str | None = None,
                   threads: int = 0) -> Runtime:
    """The runtime for ``requested`` ("onnx" | "torch"); "onnx" without onnxruntime falls back to "torch".

    ``cache_dir``: where ONNX graphs are exported (the service passes ``SAMFORGE_ONNX_CACHE_DIR``; None is
    sam_core's default folder, for library use only).
    """
    if requested == "onnx" and not onnxruntime_available():
        log.warning("SAMFORGE_DECODER_RUNTIME=onnx but onnxruntime is not installed: decoding with PyTorch")
        requested = "torch"
    if requested == "onnx":
        from sam_core.export.onnx_decoder import make_onnx_predictor

        def make_onnx(model: LoadedModel) -> Predictor:
            return make_onnx_predictor(model, cache_dir=cache_dir, threads=threads or None, device=device,
                                       max_prompts=max_prompts)

        return Runtime("onnx", make_onnx)

    def make_torch(model: LoadedModel) -> Predictor:
        return Predictor(model, device=device, max_prompts=max_prompts)

    return Runtime("torch", make_torch)
