"""samforge's ML library: load SAM-family models, segment with prompts, fine-tune, evaluate, export.

Knows nothing of gRPC. The names below are the public API; they live in subpackages grouped by
responsibility (see the README's "Layout") and are imported on first use, so ``import sam_core`` stays
cheap (``sam_core.errors`` and the services' settings import no model code)::

    from sam_core import Predictor, Prompt, load_image, load_model

    predictor = Predictor(load_model("litemedsam"))
    embedding = predictor.encode_one(load_image("scan.png"))
    result = predictor.decode(embedding, [Prompt.from_box([10, 20, 90, 120])])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # models and the model-family seam
    "load_model": "sam_core.modeling.registry",
    "LoadedModel": "sam_core.modeling.registry",
    "MODEL_REGISTRY": "sam_core.modeling.registry",
    "DEFAULT_MODEL": "sam_core.modeling.registry",
    "ModelSpec": "sam_core.modeling.family",
    "SegmentationModel": "sam_core.modeling.family",
    "ParamGroup": "sam_core.modeling.family",
    "PromptBatch": "sam_core.modeling.family",
    # inference
    "Predictor": "sam_core.inference.predictor",
    "Prompt": "sam_core.inference.prompts",
    "Embedding": "sam_core.inference.types",
    "DecodeResult": "sam_core.inference.types",
    "TiledEmbedding": "sam_core.inference.tiling",
    "encode_tiled": "sam_core.inference.tiling",
    "decode_tiled": "sam_core.inference.tiling",
    "EverythingOptions": "sam_core.inference.automatic",
    "generate": "sam_core.inference.automatic",
    "embedding_key": "sam_core.inference.embedding_cache",
    "EmbeddingStore": "sam_core.inference.embedding_store",
    # images and masks
    "decode_image": "sam_core.io.images",
    "load_image": "sam_core.io.images",
    "encode_rle": "sam_core.io.masks",
    "decode_rle": "sam_core.io.masks",
    "encode_png": "sam_core.io.masks",
    "decode_png": "sam_core.io.masks",
    "mask_to_polygons": "sam_core.io.masks",
    # data
    "load_dataset": "sam_core.data.dataset",
    "SegmentationDataset": "sam_core.data.dataset",
    "split_dataset": "sam_core.data.splits",
    "PromptConfig": "sam_core.data.prompt_sim",
    # adapters
    "AdapterConfig": "sam_core.adapters.artifact",
    "load_adapter": "sam_core.adapters.artifact",
    "save_adapter": "sam_core.adapters.artifact",
    "read_adapter_config": "sam_core.adapters.artifact",
    "AdapterRef": "sam_core.adapters.store",
    "AdapterStore": "sam_core.adapters.store",
    "FileSystemAdapterStore": "sam_core.adapters.filesystem",
    # fine-tuning
    "MethodConfig": "sam_core.training.methods",
    "FineTuningMethod": "sam_core.training.methods",
    "get_method": "sam_core.training.methods",
    "method_names": "sam_core.training.methods",
    "TrainConfig": "sam_core.training.config",
    "ProgressEvent": "sam_core.training.config",
    "Phase": "sam_core.training.config",
    "train": "sam_core.training.loop",
    "FinetuneSpec": "sam_core.training.finetune",
    "run_finetune": "sam_core.training.finetune",
    "fit_persam": "sam_core.training.persam",
    "segment_persam": "sam_core.training.persam",
    "load_persam": "sam_core.training.persam",
    # evaluation and export
    "EvalConfig": "sam_core.evaluation.evaluate",
    "evaluate": "sam_core.evaluation.evaluate",
    "dice": "sam_core.evaluation.metrics",
    "iou": "sam_core.evaluation.metrics",
    "export_encoder_onnx": "sam_core.export.onnx_encoder",
    "export_decoder_onnx": "sam_core.export.onnx_decoder",
}

__all__ = [
    "AdapterConfig", "AdapterRef", "AdapterStore", "DEFAULT_MODEL", "DecodeResult", "Embedding", "EmbeddingStore",
    "EvalConfig", "EverythingOptions", "FileSystemAdapterStore", "FineTuningMethod", "FinetuneSpec", "LoadedModel",
    "MODEL_REGISTRY", "MethodConfig", "ModelSpec", "ParamGroup", "Phase", "Predictor", "ProgressEvent", "Prompt",
    "PromptBatch", "PromptConfig", "SegmentationDataset", "SegmentationModel", "TiledEmbedding", "TrainConfig",
    "decode_image", "decode_png", "decode_rle", "decode_tiled", "dice", "embedding_key", "encode_png", "encode_rle",
    "encode_tiled", "evaluate", "export_decoder_onnx", "export_encoder_onnx", "fit_persam", "generate", "get_method",
    "iou", "load_adapter", "load_dataset", "load_image", "load_model", "load_persam", "mask_to_polygons",
    "method_names", "read_adapter_config", "run_finetune", "save_adapter", "segment_persam", "split_dataset",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sam_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from sam_core.adapters.artifact import AdapterConfig, load_adapter, read_adapter_config, save_adapter
    from sam_core.adapters.filesystem import FileSystemAdapterStore
    from sam_core.adapters.store import AdapterRef, AdapterStore
    from sam_core.data.dataset import SegmentationDataset, load_dataset
    from sam_core.data.prompt_sim import PromptConfig
    from sam_core.data.splits import split_dataset
    from sam_core.evaluation.evaluate import EvalConfig, evaluate
    from sam_core.evaluation.metrics import dice, iou
    from sam_core.export.onnx_decoder import export_decoder_onnx
    from sam_core.export.onnx_encoder import export_encoder_onnx
    from sam_core.inference.automatic import EverythingOptions, generate
    from sam_core.inference.embedding_cache import embedding_key
    from sam_core.inference.embedding_store import EmbeddingStore
    from sam_core.inference.predictor import Predictor
    from sam_core.inference.prompts import Prompt
    from sam_core.inference.tiling import TiledEmbedding, decode_tiled, encode_tiled
    from sam_core.inference.types import DecodeResult, Embedding
    from sam_core.io.images import decode_image, load_image
    from sam_core.io.masks import decode_png, decode_rle, encode_png, encode_rle, mask_to_polygons
    from sam_core.modeling.family import ModelSpec, ParamGroup, PromptBatch, SegmentationModel
    from sam_core.modeling.registry import DEFAULT_MODEL, MODEL_REGISTRY, LoadedModel, load_model
    from sam_core.training.config import Phase, ProgressEvent, TrainConfig
    from sam_core.training.finetune import FinetuneSpec, run_finetune
    from sam_core.training.loop import train
    from sam_core.training.methods import FineTuningMethod, MethodConfig, get_method, method_names
    from sam_core.training.persam import fit_persam, load_persam, segment_persam
