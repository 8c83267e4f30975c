"""Frozen-prefix activation cache: what an encoder-side method (``lora``, ``adapter``) need not recompute.

Such a method trains nothing before the stage holding its first trained module
(:meth:`~sam_core.training.methods.base.FineTuningMethod.first_trained_module`), so the activations entering
that stage (:class:`~sam_core.modeling.family.EncoderPrefix`) depend only on the pixels of the window seen and
on what the signature names. :class:`PrefixCache` computes them once per window, stores them in a
:class:`ActivationStore` in the run folder and hands them back, so training runs only the encoder's suffix.
The data path changes no pixels per step (prompts, box jitter included, are drawn from the mask), so one entry
per window serves every step.

:class:`ActivationStore` follows :class:`~sam_core.inference.embedding_store.EmbeddingStore` (its own format:
activations are not embeddings): one safetensors file per key (``<root>/<key[:2]>/<key>.safetensors``), a
*signature* in ``signature.json`` and copied into every entry, checked when the store is opened and when an
entry is read, a sha256 of the tensor's bytes, atomic writes (:func:`sam_core.files.atomic_write_bytes`). A
store or entry with another signature is an error (or, on open with ``reset_on_mismatch``, wiped), never
reused; a corrupt or truncated entry is deleted and recomputed. Activations keep the dtype the prefix produced
(bfloat16 under bf16 autocast, which the signature names) and their memory layout: an entry holds them in
physical order (``permutation`` in its metadata) and :meth:`PrefixCache.assemble` batches them into the
strides the batched prefix would have produced (TinyViT's is a transposed view; kernels round differently on
another layout), so the cached path computes what the uncached one does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sam_core.errors import InvalidInput
from sam_core.files import atomic_write_bytes, atomic_write_text, is_temporary
from sam_core.modeling.family import EncoderPrefix

log = logging.getLogger(__name__)

ENTRY_FORMAT = "samforge-prefix-activation-v1"
STORE_FORMAT = "samforge-prefix-store-v1"
SIGNATURE_FILE = "signature.json"
_FIELD = "prefix_cache"


class _CorruptEntry(Exception):
    """An entry that cannot be parsed or fails its checksum (deleted and treated as absent)."""


def _digest(tensor: torch.Tensor) -> str:
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return hashlib.sha256(raw.numpy().data.cast("B")).hexdigest()


def _check_key(key: str) -> str:
    if len(key) < 8 or any(c not in "0123456789abcdef" for c in key):
        raise InvalidInput(f"expected a lowercase hex key, got {key!r}", field="key")
    return key


class ActivationStore:
    """A directory of activation tensors (one per key) under one signature (str -> str)."""

    def __init__(self, root: str | os.PathLike[str], *, signature: Mapping[str, str],
                 reset_on_mismatch: bool = False) -> None:
        self.root = Path(root)
        self.signature = dict(sorted(signature.items()))
        self._signature_json = json.dumps(self.signature, sort_keys=True, separators=(",", ":"))
        self.root.mkdir(parents=True, exist_ok=True)
        differences = self._differences()
        if differences:
            message = f"{self.root} holds prefix activations with another signature: " + "; ".join(differences)
            if not reset_on_mismatch:
                raise InvalidInput(message, field=_FIELD)
            log.warning("%s; wiping it", message)
            self.clear()
        if differences or not self.signature_path.exists():
            document = {"format": STORE_FORMAT, "signature": self.signature}
            atomic_write_text(self.signature_path, json.dumps(document, sort_keys=True, indent=2) + "\n")

    @property
    def signature_path(self) -> Path:
        return self.root / SIGNATURE_FILE

    def _differences(self) -> list[str]:
        if not self.signature_path.exists():
            return ["signature.json is missing but entries exist"] if self._entries() else []
        try:
            stored = json.loads(self.signature_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return [f"signature.json is unreadable ({exc})"]
        if not isinstance(stored, dict) or stored.get("format") != STORE_FORMAT \
                or not isinstance(stored.get("signature"), dict):
            return [f"signature.json is not a {STORE_FORMAT} document"]
        old: dict[str, object] = stored["signature"]
        return [f"{name}: stored {old.get(name)!r}, requested {self.signature.get(name)!r}"
                for name in sorted(set(old) | set(self.signature)) if old.get(name) != self.signature.get(name)]

    def _entries(self) -> list[Path]:
        return [p for p in self.root.glob("??/*.safetensors") if p.is_file()]

    def __len__(self) -> int:
        return len(self._entries())

    def path_for(self, key: str) -> Path:
        key = _check_key(key)
        return self.root / key[:2] / f"{key}.safetensors"

    def put(self, key: str, activations: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Store ``activations`` (batch of one) atomically under ``key`` in physical order; returns that CPU
        tensor and the permutation of its dimensions (``activations.permute(perm)`` is it)."""
        perm = physical_order(activations)
        stored = activations.detach().to("cpu").permute(perm).contiguous()
        metadata = {"format": ENTRY_FORMAT, "key": key, "signature": self._signature_json,
                    "permutation": json.dumps(list(perm)), "sha256": _digest(stored)}
        path = self.path_for(key)
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, safetensors.torch.save({"activations": stored}, metadata=metadata))
        return stored, perm

    def get(self, key: str) -> tuple[torch.Tensor, tuple[int, ...]] | None:
        """(activations in physical order, CPU; their permutation) stored under ``key``, or None when absent
        or corrupt (then deleted).
        An entry written under another signature or key raises InvalidInput (field ``prefix_cache``)."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            metadata, tensor = self._read(path)
        except _CorruptEntry as exc:
            log.warning("deleting corrupt prefix activation entry %s: %s", path, exc)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        if metadata.get("signature") != self._signature_json or metadata.get("key") != key:
            raise InvalidInput(f"entry {path} was written for key {metadata.get('key')!r} under signature "
                               f"{metadata.get('signature')}, not for {key!r} under {self._signature_json}",
                               field=_FIELD)
        return tensor, tuple(json.loads(metadata["permutation"]))

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, str], torch.Tensor]:
        try:
            with safetensors.safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                if list(fh.keys()) != ["activations"]:
                    raise _CorruptEntry(f"expected the single tensor 'activations', found {list(fh.keys())}")
                tensor = fh.get_tensor("activations")
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _CorruptEntry(str(exc)) from exc
        if metadata.get("format") != ENTRY_FORMAT or metadata.get("sha256") != _digest(tensor.contiguous()):
            raise _CorruptEntry("format or checksum mismatch")
        try:
            perm = json.loads(metadata["permutation"])
        except (KeyError, ValueError) as exc:
            raise _CorruptEntry(f"bad permutation: {exc}") from exc
        if not isinstance(perm, list) or sorted(perm) != list(range(tensor.ndim)) or perm[0] != 0:
            raise _CorruptEntry(f"bad permutation {perm!r}")
        return metadata, tensor

    def clear(self) -> None:
        """Delete every entry and leftover temporary file (signature.json stays)."""
        for path in self.root.glob("??/*"):
            if path.is_file() and (path.suffix == ".safetensors" or is_temporary(path)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


class PrefixCache:
    """Activations of one frozen encoder prefix per window, computed once and kept in an ActivationStore.

    ``precision`` is what the prefix runs under (``"float32"`` or ``"bfloat16"`` autocast, as the training
    step would run it); ``key`` of a window is its pixels' content hash.
    """

    def __init__(self, split: EncoderPrefix, store: ActivationStore, device: torch.device, bf16: bool) -> None:
        self.split = split
        self.store = store
        self.device = device
        self.bf16 = bf16

    def compute(self, model_input: torch.Tensor) -> torch.Tensor:
        """3 x S x S preprocessed window -> its prefix activations (batch of one, on ``device``).

        Runs with autograd enabled to prove the prefix frozen: activations that require grad would mean the
        method trains something the cache would freeze, which is refused.
        """
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            activations = self.split.prefix(model_input[None].to(self.device, torch.float32))
        if activations.requires_grad:
            raise InvalidInput(f"the encoder before {self.split.cut} has trainable parameters; its activations "
                               "cannot be cached", field="method")
        return activations

    def activations(self, key: str, model_input: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The window's activations (batch of one, CPU, physical order; their permutation) from the store, else
        computed and stored."""
        found = self.store.get(key)
        return found if found is not None else self.store.put(key, self.compute(model_input()))

    @staticmethod
    def assemble(parts: list[tuple[torch.Tensor, tuple[int, ...]]], device: torch.device) -> torch.Tensor:
        """Windows' activations -> one batch with the strides the batched prefix produces."""
        perms = {perm for _, perm in parts}
        if len(perms) != 1:
            raise InvalidInput(f"cached activations disagree on their layout: {sorted(perms)}", field=_FIELD)
        perm = perms.pop()
        inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
        return torch.cat([tensor for tensor, _ in parts]).to(device).permute(inverse)


def physical_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """The batch dimension, then the others from the largest stride to the smallest (``tensor.permute`` of it
    is contiguous for a dense tensor)."""
    strides = tensor.stride()
    rest = sorted(range(1, tensor.ndim), key=lambda d: -strides[d])
    return (0, *rest)


def prefix_signature(model_id: str, weights_sha256: str, preprocess_version: str, cut: str, bf16: bool,
                     dataset: str) -> dict[str, str]:
    """What cached prefix activations depend on (torch's version too: kernels may round differently)."""
    return {"model_id": model_id, "weights_sha256": weights_sha256, "preprocess_version": preprocess_version,
            "cut": cut, "precision": "bfloat16" if bf16 else "float32", "dataset": dataset,
            "torch": torch.__version__}
