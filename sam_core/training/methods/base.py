"""The fine-tuning method plug-in interface and its registry (peft-style: one module per method).

A :class:`FineTuningMethod` says everything the rest of samforge may ask about a method, so no caller
switches on a method's name:

- :meth:`~FineTuningMethod.inject` adds the method's modules to a model (LoRA layers, adapters) through the
  family interface (:meth:`~sam_core.modeling.family.SegmentationModel.attention_sites`), and
  :meth:`~FineTuningMethod.set_trainable` marks exactly the tensors it trains: whole parameter groups
  (:class:`~sam_core.modeling.family.ParamGroup`) plus the parameters of the modules it injected (found by
  type, never by parameter-name substrings). After :meth:`~FineTuningMethod.prepare` the trainable tensors are
  exactly what the method's adapter artifact stores (:func:`trainable_state`);
- ``changes_image_encoder``: its embeddings are its own (they never share the base model's cache entries);
  :meth:`~FineTuningMethod.first_trained_module` names the first encoder module it trains: training caches
  the activations of everything before that module's stage (:mod:`sam_core.training.prefix_cache`);
- ``one_shot``: fitted from one example by its own procedure (PerSAM), not by the training loop; its artifact
  holds that procedure's tensors, not model weights.

The prompt encoder is always frozen (as in MedSAM); BatchNorm statistics stay frozen (:func:`train_mode`).
Methods register themselves with :func:`register`; :mod:`sam_core.training.methods` imports them all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sam_core.errors import InvalidInput
from sam_core.modeling.family import ParamGroup, SegmentationModel

DEFAULT_METHOD = "decoder"


@dataclass(frozen=True)
class MethodConfig:
    """``method`` names a registered :class:`FineTuningMethod`; ``rank`` and ``alpha`` shape LoRA updates
    (scale alpha / rank), ``adapter_ratio`` the adapters' hidden width. Stored in adapter_config.json."""

    method: str = DEFAULT_METHOD
    rank: int = 4
    alpha: float = 4.0
    adapter_ratio: float = 0.25

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.rank < 1:
            raise InvalidInput(f"rank must be >= 1, got {self.rank}", field="rank")
        if not 0 < self.adapter_ratio <= 4:
            raise InvalidInput(f"adapter_ratio must be in (0, 4], got {self.adapter_ratio}", field="adapter_ratio")

    @property
    def plugin(self) -> FineTuningMethod:
        return get_method(self.method)

    @property
    def changes_image_encoder(self) -> bool:
        """True when the method changes the image encoder (so embeddings differ from the base model's)."""
        return self.plugin.changes_image_encoder


class FineTuningMethod:
    """Base class: a method that trains ``trained_groups`` and injects nothing (subclasses extend it)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    changes_image_encoder: ClassVar[bool] = False
    one_shot: ClassVar[bool] = False
    trained_groups: ClassVar[tuple[ParamGroup, ...]] = (ParamGroup.MASK_DECODER,)
    # AdamW peak learning rate of the fine-tuning-quality benchmark runs (bench/finetune_quality.py)
    recommended_lr: ClassVar[float] = 1e-4

    def inject(self, net: SegmentationModel, cfg: MethodConfig) -> None:
        """Add the method's modules to ``net`` in place (nothing by default)."""

    def injected_modules(self, net: SegmentationModel) -> list[nn.Module]:
        """The modules :meth:`inject` added whose own parameters train (found by type)."""
        return []

    def first_trained_module(self, net: SegmentationModel) -> str | None:
        """Name of the first image-encoder module this method trains: None when the encoder stays frozen,
        ``"image_encoder"`` (nothing to cache) by default when it changes."""
        return "image_encoder" if self.changes_image_encoder else None

    def set_trainable(self, net: SegmentationModel) -> None:
        """``requires_grad`` on exactly the trained groups and the injected modules' parameters."""
        net.requires_grad_(False)
        for group in self.trained_groups:
            for module in net.group_modules(group):
                module.requires_grad_(True)
        for module in self.injected_modules(net):
            module.requires_grad_(True)

    def prepare(self, net: SegmentationModel, cfg: MethodConfig) -> None:
        self.inject(net, cfg)
        self.set_trainable(net)

    def trainable_copy(self, net: SegmentationModel, cfg: MethodConfig) -> SegmentationModel:
        """A new network prepared for this method; shares the frozen encoders with ``net`` when the method
        leaves the image encoder unchanged (only the mask decoder is copied), else a deep copy."""
        copied = copy.deepcopy(net) if self.changes_image_encoder else net.sharing_encoder()
        self.prepare(copied, cfg)
        return copied


_REGISTRY: dict[str, FineTuningMethod] = {}


def register(method: FineTuningMethod) -> FineTuningMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"fine-tuning method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> FineTuningMethod:
    """The registered method called ``name``; InvalidInput(field="method") naming the known ones otherwise."""
    method = _REGISTRY.get(name)
    if method is None:
        raise InvalidInput(f"unknown method {name!r}; one of {', '.join(method_names())}", field="method")
    return method


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order (what CLIs and the trainer offer)."""
    return tuple(_REGISTRY)


def trainable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """name -> detached CPU tensor for every parameter with requires_grad (what an artifact stores)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in net.named_parameters() if p.requires_grad}


def trainable_names(net: nn.Module) -> set[str]:
    return {n for n, p in net.named_parameters() if p.requires_grad}


def train_mode(net: SegmentationModel) -> None:
    """Train mode for the trainable parts; BatchNorm statistics and frozen modules stay in eval mode."""
    net.eval()
    for group in (ParamGroup.MASK_DECODER, ParamGroup.IMAGE_ENCODER):
        for module in net.group_modules(group):
            if any(p.requires_grad for p in module.parameters()):
                module.train()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
