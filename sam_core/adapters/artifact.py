"""Adapter artifacts: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT-like).

A folder holds exactly what a fine-tuning run changed: the trainable tensors of its method (see
:mod:`sam_core.training.methods`) or, for a one-shot method, its fitted tensors. The config
(sorted keys) records the method and its hyper-parameters, the base model id, family and weights sha256,
the trained modules, metrics, creation time, the parent version, the sha256 of the tensor file and, for a
guarded run, its signed held-out split (:mod:`sam_core.training.guard`).

:func:`save_adapter` writes to a temporary folder, fsyncs and renames, so a partial artifact is never
visible. :func:`load_adapter` refuses — with one :class:`AdapterInvalid` naming every problem — a wrong
base model (another family's named as such, with both model ids), a checksum mismatch, missing or extra
tensors and wrong shapes; it returns a *new* ``LoadedModel`` and never modifies the base. A decoder-only
adapter shares the base model's image encoder module and embeddings (``shares_base_embeddings``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sam_core.errors import AdapterInvalid, NotFound
from sam_core.files import atomic_write_text, file_sha256, publish_dir
from sam_core.modeling.family import SegmentationModel
from sam_core.modeling.registry import LoadedModel
from sam_core.training.methods import MethodConfig, get_method, trainable_names

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "method", "base_model", "base_model_id", "base_weights_sha256",
                 "weights_sha256", "shares_base_embeddings")


@dataclass(frozen=True)
class AdapterConfig:
    method: str
    base_model: str
    base_model_id: str
    base_weights_sha256: str
    weights_sha256: str
    shares_base_embeddings: bool
    rank: int = 4
    alpha: float = 4.0
    adapter_ratio: float = 0.25
    trained_modules: tuple[str, ...] = ()
    n_parameters: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    parent: str | None = None
    name: str | None = None
    base_family: str = "sam1"  # the base's ModelSpec.family; artifacts written before it existed are SAM 1
    heldout_split: dict[str, Any] | None = None  # sam_core.training.guard.HeldoutSplit.to_json()
    format_version: int = FORMAT_VERSION

    @property
    def method_config(self) -> MethodConfig:
        return MethodConfig(self.method, self.rank, self.alpha, self.adapter_ratio)

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["trained_modules"] = list(self.trained_modules)
        if self.heldout_split is None:  # unguarded artifacts keep their exact earlier form
            del data["heldout_split"]
        return data

    @staticmethod
    def from_json(data: dict[str, Any], source: str) -> AdapterConfig:
        """Unknown keys are tolerated with a warning; missing required keys are one clear error."""
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise AdapterInvalid(f"{source} lacks required keys: {', '.join(missing)}", field="adapter")
        known = set(AdapterConfig.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("%s: ignoring unknown adapter config keys %s", source, unknown)
        if data["format_version"] > FORMAT_VERSION:
            raise AdapterInvalid(f"{source} has format_version {data['format_version']}; this samforge reads "
                                 f"<= {FORMAT_VERSION}", field="adapter")
        values = {k: v for k, v in data.items() if k in known}
        values["trained_modules"] = tuple(values.get("trained_modules", ()))
        try:
            config = AdapterConfig(**values)
            _ = config.method_config  # validates method / rank / ratio
        except (TypeError, ValueError) as exc:
            raise AdapterInvalid(f"{source}: {exc}", field="adapter") from exc
        return config


def _module_prefixes(names: set[str]) -> tuple[str, ...]:
    return tuple(sorted({".".join(n.split(".")[:2]) for n in names}))


def save_adapter(out_dir: str | os.PathLike[str], model: LoadedModel, tensors: dict[str, torch.Tensor],
                 method: MethodConfig, *, metrics: dict[str, Any] | None = None, parent: str | None = None,
                 name: str | None = None) -> AdapterConfig:
    """Write an artifact atomically to ``out_dir`` (which must not exist yet); returns its config."""
    out = Path(out_dir)
    if out.exists():
        raise AdapterInvalid(f"{out} already exists; adapter versions are immutable", field="out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weights = tmp / WEIGHTS_NAME
        # one metadata key: safetensors writes several in a random order, and the file's sha256 is the adapter's
        # identity (the method is in adapter_config.json)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(weights),
                  metadata={"format": "pt"})
        config = AdapterConfig(
            method=method.method, base_model=model.spec.name, base_model_id=model.model_id,
            base_weights_sha256=model.weights_sha256, base_family=model.spec.family,
            weights_sha256=file_sha256(weights),
            shares_base_embeddings=not method.changes_image_encoder, rank=method.rank, alpha=method.alpha,
            adapter_ratio=method.adapter_ratio, trained_modules=_module_prefixes(set(tensors)),
            n_parameters=int(sum(t.numel() for t in tensors.values())), metrics=dict(metrics or {}),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), parent=parent, name=name,
        )
        write_adapter_config(tmp, config)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def write_adapter_config(folder: str | os.PathLike[str], config: AdapterConfig) -> None:
    """(Re)write ``folder``'s config atomically (the tensor file, and so its checksum, is left as it is)."""
    atomic_write_text(Path(folder) / CONFIG_NAME, json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n")


def read_adapter_config(path: str | os.PathLike[str]) -> AdapterConfig:
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise NotFound(f"no {CONFIG_NAME} in {folder}", field="adapter")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterInvalid(f"{config_path} is not valid JSON ({exc})", field="adapter") from exc
    if not isinstance(data, dict):
        raise AdapterInvalid(f"{config_path} must hold a JSON object", field="adapter")
    return AdapterConfig.from_json(data, str(config_path))


def read_adapter_tensors(path: str | os.PathLike[str], config: AdapterConfig) -> dict[str, torch.Tensor]:
    """Load the tensor file after checking its sha256 against the config (safetensors only)."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterInvalid(f"{weights} is missing", field="adapter")
    actual = file_sha256(weights)
    if actual != config.weights_sha256:
        raise AdapterInvalid(f"{weights} checksum {actual[:16]}... does not match the config's "
                             f"{config.weights_sha256[:16]}...", field="adapter")
    try:
        tensors: dict[str, torch.Tensor] = load_file(str(weights))
        return tensors
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise AdapterInvalid(f"{weights} is not a readable safetensors file ({exc})", field="adapter") from exc


def check_tensors(expected: dict[str, torch.Size], tensors: dict[str, torch.Tensor], source: str) -> None:
    """One error listing missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k]) != tuple(tensors[k].shape))
    problems = []
    for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
        if names:
            problems.append(f"{len(names)} {label} tensors (e.g. {', '.join(names[:3])})")
    if problems:
        raise AdapterInvalid(f"{source}: " + "; ".join(problems), field="adapter")


def check_base(config: AdapterConfig, model: LoadedModel, source: str) -> None:
    if config.base_family != model.spec.family:
        raise AdapterInvalid(f"{source} is a {config.base_family} family adapter trained on {config.base_model_id}; "
                             f"{model.model_id} is a {model.spec.family} family model", field="adapter")
    if config.base_model_id != model.model_id or config.base_weights_sha256 != model.weights_sha256:
        raise AdapterInvalid(f"{source} was trained on {config.base_model_id}, not on {model.model_id}",
                             field="adapter")


def adapted_net(model: LoadedModel, method: MethodConfig) -> SegmentationModel:
    """A new network prepared for ``method`` (shares the base encoders when the method leaves them unchanged)."""
    return method.plugin.trainable_copy(model.net, method)


def load_adapter(model: LoadedModel, path: str | os.PathLike[str]) -> LoadedModel:
    """Base model + artifact -> a new LoadedModel serving the adapter (the base is left untouched).

    One-shot artifacts (PerSAM) are not model weights: load them with their method's loader
    (:func:`sam_core.training.persam.load_persam`).
    """
    source = str(path)
    config = read_adapter_config(path)
    if get_method(config.method).one_shot:
        raise AdapterInvalid(f"{source} is a one-shot {config.method} artifact, not model weights; load it with "
                             "its method's loader", field="adapter")
    check_base(config, model, source)
    tensors = read_adapter_tensors(path, config)
    method = config.method_config
    net = adapted_net(model, method)
    params = dict(net.named_parameters())
    check_tensors({n: params[n].shape for n in trainable_names(net)}, tensors, source)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return adapted_model(model, net, config)


def adapter_identity(config: AdapterConfig) -> str:
    """``<name or method>-<16 hex>`` derived from the tensor file's sha256 (used in embedding keys)."""
    digest = hashlib.sha256(config.weights_sha256.encode()).hexdigest()[:16]
    return f"{config.name or config.method}-{digest}"


def adapted_model(model: LoadedModel, net: SegmentationModel, config: AdapterConfig) -> LoadedModel:
    """Wrap a prepared, weight-loaded network as a frozen LoadedModel that records its adapter."""
    net.requires_grad_(False)
    net.eval()
    identity = adapter_identity(config)
    return LoadedModel(net=net, spec=model.spec, weights_sha256=model.weights_sha256, source=model.source,
                       adapter=config, adapter_id=identity,
                       encoder_adapter_id=None if config.shares_base_embeddings else identity)
